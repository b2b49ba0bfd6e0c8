"""The HTML report in a real browser: headless Chromium renders every figure, no console errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.report import page
from orchestrator.report.data import load_experiment
from tests.report.browser import Chromium, ink_fraction, save
from tests.report.synthetic import serving_experiment, training_experiment

# Screenshots land here when set (to look at them); else in the test's temporary folder.
SHOTS_ENV = "ORCH_REPORT_SCREENSHOTS"


@pytest.fixture(scope="module")
def chromium():
    with Chromium() as browser:
        yield browser


@pytest.mark.parametrize("make", [serving_experiment, training_experiment], ids=["serving", "training"])
def test_report_renders_in_chromium(chromium: Chromium, make, tmp_path: Path) -> None:
    data = load_experiment(make(tmp_path))
    report = page.build(data)
    index = page.write(report, tmp_path / "out", "html")[0]
    visit = chromium.visit(index.as_uri())
    shots = Path(os.environ.get(SHOTS_ENV, tmp_path))
    save(visit.screenshot, shots / f"report-{data.kind}.png")

    assert visit.errors == []
    assert [f["id"] for f in visit.figures] == [f"fig-{f.name}" for f in report.figures]
    assert ink_fraction(visit.screenshot) > 0.02  # not a blank page
    for figure in visit.figures:
        assert figure["complete"] and figure["natural"] > 0, figure  # the SVG decoded
        assert figure["w"] > 300 and figure["h"] > 200, figure
        # Axes, lines and labels drawn inside the figure's box on the screenshot.
        assert ink_fraction(visit.screenshot, (figure["x"], figure["y"], figure["w"], figure["h"])) > 0.03, figure


def test_broken_figure_and_console_error_are_caught(chromium: Chromium, tmp_path: Path) -> None:
    # The checks above can fail: a figure whose image does not decode, and a script error.
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><figure id="fig-x"><img src="data:image/svg+xml;base64,bm90IHN2Zw==">'
                      "</figure><script>console.error('boom')</script></body></html>")
    visit = chromium.visit(broken.as_uri())
    assert visit.figures[0]["natural"] == 0
    assert any("boom" in e for e in visit.errors)
