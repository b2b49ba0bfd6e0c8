"""The report as files: a self-contained HTML page (figures embedded) or Markdown beside SVG files.

Layout of ``--out DIR``::

    index.html | report.md     the page
    figures/<name>.svg         every figure, also logged to MLflow
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.provenance import mixed_commits_warning
from orchestrator.report.data import ExperimentData
from orchestrator.report.figures import Rendered, render
from orchestrator.report.summary import budget_table, format_value, speedup_table, state_counts, summarize
from orchestrator.store import atomic_write_bytes

PAGE_NAMES = {"html": "index.html", "md": "report.md"}
STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1400px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} .meta{color:#555;margin-bottom:1.5em}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:1.2em}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:.5em;background:#fff}
figure img{width:100%;height:auto;display:block}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;white-space:nowrap} th{background:#f4f4f4}
td.axis,th.axis{text-align:left} .scroll{overflow-x:auto}
"""


@dataclass(frozen=True)
class Section:
    """A titled table of the page: column names and formatted cells; ``axes`` columns align left."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    axes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Report:
    """Everything the page shows."""

    title: str
    meta: list[str]
    figures: list[Rendered]
    sections: list[Section]


def _cell(mean: object, spread: object) -> str:
    text = format_value(mean)
    if isinstance(spread, float) and spread == spread and text != "-":
        text += f" ± {format_value(spread)}"
    return text


def _sections(data: ExperimentData, columns: dict[str, list[str]]) -> list[Section]:
    out = []
    for rep in summarize(data, columns):
        # Columns no finished trial filled (e.g. quality when it was not measured) are left out.
        metrics = [c for c in rep.frame.columns if c not in rep.axes and rep.frame[c].notna().any()]
        rows = []
        for index in range(len(rep.frame)):
            row = [format_value(rep.frame[a].iloc[index]) for a in rep.axes]
            for metric in metrics:
                spread = rep.spread[metric].iloc[index] if rep.spread is not None and metric in rep.spread else None
                row.append(_cell(rep.frame[metric].iloc[index], spread))
            rows.append(row)
        out.append(Section(f"{rep.table} (mean ± std over repeats)", [*rep.axes, *metrics], rows, frozenset(rep.axes)))
    budgets = budget_table(data)
    if budgets is not None:
        axes = [c for c in budgets.columns if c in data.axes]
        rows = [[format_value(v) for v in record] for record in budgets.itertuples(index=False)]
        out.append(Section("Quality, memory and throughput per KV budget (means over repeats)", list(budgets.columns),
                           rows, frozenset(axes)))
    speedup = speedup_table(data)
    if speedup is not None:
        axes = [c for c in speedup.columns if c in data.axes]
        rows = [[format_value(v) for v in record] for record in speedup.itertuples(index=False)]
        out.append(Section("Speedup against the baselines (baseline time / this time)", list(speedup.columns), rows,
                           frozenset(axes)))
    return out


def build(data: ExperimentData, columns: dict[str, list[str]] | None = None) -> Report:
    """Figures and tables of an experiment."""
    counts = state_counts(data.manifest)
    submission = (data.manifest.get("submissions") or [{}])[-1]
    meta = [
        f"kind: {data.kind}",
        "trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        f"axes: {', '.join(data.axes) or 'none'}",
        f"last submission: {submission.get('id', '?')} ({submission.get('status', '?')})",
        f"generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
    ]
    if submission.get("git"):
        meta.insert(4, f"git: {submission['git']}")
    mixed = mixed_commits_warning(data.manifest)
    if mixed:
        meta.append(mixed)
    return Report(title=f"{data.experiment}", meta=meta, figures=render(data), sections=_sections(data, columns or {}))


def _html_table(section: Section) -> str:
    def cls(column: str) -> str:
        return ' class="axis"' if column in section.axes else ""

    head = "".join(f"<th{cls(c)}>{html.escape(c)}</th>" for c in section.columns)
    body = "".join(
        "<tr>" + "".join(f"<td{cls(c)}>{html.escape(v)}</td>" for c, v in zip(section.columns, row, strict=True)) + "</tr>"
        for row in section.rows
    )
    return f"<h3>{html.escape(section.title)}</h3><div class=scroll><table><tr>{head}</tr>{body}</table></div>"


def to_html(report: Report) -> str:
    """One page, no external resources: figures are SVG data URIs, the style is inline."""
    figures = "".join(
        f'<figure id="fig-{f.name}"><img alt="{html.escape(f.title)}" src="data:image/svg+xml;base64,'
        f'{base64.b64encode(f.svg.encode()).decode()}"></figure>'
        for f in report.figures
    )
    tables = "".join(_html_table(s) for s in report.sections)
    meta = " · ".join(html.escape(m) for m in report.meta)
    return (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>orch report: {html.escape(report.title)}</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(report.title)}</h1><div class=meta>{meta}</div>"
        f"<h2>Figures</h2><div class=figures>{figures or '<p>no figure: no axis varies in the finished trials</p>'}</div>"
        f"<h2>Tables</h2>{tables or '<p>no finished trials with summaries yet</p>'}</body></html>\n"
    )


def to_markdown(report: Report) -> str:
    """The page as Markdown; figures are linked from figures/."""
    lines = [f"# {report.title}", "", " · ".join(report.meta), ""]
    for fig in report.figures:
        lines += [f"![{fig.title}](figures/{fig.name}.svg)", ""]
    for section in report.sections:
        lines += [f"## {section.title}", "", "| " + " | ".join(section.columns) + " |",
                  "|" + "|".join("---" if c in section.axes else "---:" for c in section.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in section.rows]
        lines.append("")
    return "\n".join(lines)


def write(report: Report, out: Path, fmt: str) -> list[Path]:
    """Write the page (``html`` or ``md``) and the figures' SVG files; returns the page first."""
    page = out / PAGE_NAMES[fmt]
    atomic_write_bytes(page, (to_html(report) if fmt == "html" else to_markdown(report)).encode())
    files = [page]
    for fig in report.figures:
        path = out / "figures" / f"{fig.name}.svg"
        atomic_write_bytes(path, fig.svg.encode())
        files.append(path)
    return files

