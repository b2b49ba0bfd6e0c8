"""The Grafana dashboards query exactly the metrics orch emits, with labels those metrics carry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from orchestrator.telemetry import METRICS, RAY_PREFIX, exported_names
from tests.conftest import REPO

DASHBOARDS = REPO / "dashboards"
METRIC_TOKEN = re.compile(r"\b(ray_[A-Za-z0-9_]+)")
GROUP_LABELS = re.compile(r"\bby \(([^)]*)\)")
SELECTOR_LABELS = re.compile(r"[{,]\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
# Labels Prometheus or Ray put on every series besides a metric's own tags.
ALWAYS = {"le", "job", "instance", "SessionName", "NodeAddress", "Component", "WorkerId"}


def _queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            queries.append(query)
    return queries


def _base(series: str) -> str:
    name = series.removeprefix(RAY_PREFIX)
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in {m.name for m in METRICS}:
            return name.removesuffix(suffix)
    return name


def test_every_query_uses_emitted_metrics_and_their_labels() -> None:
    files = sorted((DASHBOARDS / "grafana").glob("*.json"))
    assert files
    tags = {m.name: set(m.tags) for m in METRICS}
    used: set[str] = set()
    for path in files:
        dashboard = json.loads(path.read_text())
        queries = _queries(dashboard)
        assert queries, path
        for query in queries:
            names = METRIC_TOKEN.findall(query)
            assert names, f"{path.name}: query without an orch metric: {query}"
            assert set(names) <= exported_names(), f"{path.name}: {set(names) - exported_names()} not emitted"
            allowed = set().union(*(tags[_base(n)] for n in names)) | ALWAYS
            labels = {label.strip() for group in GROUP_LABELS.findall(query) for label in group.split(",") if label.strip()}
            labels |= set(SELECTOR_LABELS.findall(query))
            assert labels <= allowed, f"{path.name}: labels {labels - allowed} not on {names}"
            used.update(_base(n) for n in names)
        for panel in dashboard["panels"]:
            assert panel["title"] and panel["targets"] and panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
    assert used == {m.name for m in METRICS}  # every emitted metric is on a dashboard


def test_provisioning_files_point_at_the_dashboards_and_prometheus() -> None:
    datasource = yaml.safe_load((DASHBOARDS / "provisioning" / "datasources" / "orch.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((DASHBOARDS / "provisioning" / "dashboards" / "orch.yaml").read_text())
    assert provider["providers"][0]["type"] == "file" and provider["providers"][0]["options"]["path"]
    prometheus = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    files = prometheus["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert Path(files[0]).name == "prom_metrics_service_discovery.json"
