"""A real Prometheus scrapes Ray's metrics export (found through Ray's service-discovery file)
while a short serving grid runs, and finds orch's metrics with plausible values; the same run
streams live step metrics into the trials' MLflow runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from backends.network.ports import free_port
from tests.conftest import REPO
from tests.serving.conftest import TINY_LLAMA

PROMETHEUS = shutil.which("prometheus")
NUM_REQUESTS = 40  # >= 2.5 s per trial: live metrics tick every 1 s, Prometheus scrapes every 1 s
RATES = (8.0, 16.0)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(PROMETHEUS is None, reason="Debian package `prometheus` (make system-deps)")]


def _query(port: int, expr: str) -> dict[tuple, float]:
    """Instant query -> {label values (sorted items): value}."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in body["data"]["result"]}


@pytest.fixture
def workdir():
    # Short path: Ray's Unix sockets live under its temp folder (108-byte limit).
    folder = Path(tempfile.mkdtemp(prefix="orch-prom-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_prometheus_finds_orch_metrics_during_a_grid(workdir: Path) -> None:
    ray_tmp = workdir / "raytmp"
    ray_tmp.mkdir()
    config = yaml.safe_load((REPO / "dashboards" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    sd = config["scrape_configs"][0]["file_sd_configs"][0]
    sd["files"] = [str(ray_tmp / "ray" / Path(sd["files"][0]).name)]
    sd["refresh_interval"] = "1s"
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"),
    )
    try:
        model = workdir / "tiny"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(TINY_LLAMA))
        grid = {
            "experiment": "prom", "kind": "serving",
            "base": {"model": str(model), "backend": "full", "engine": {"max_num_seqs": 8, "max_model_len": 128},
                     "load": {"arrival": "poisson", "num_requests": NUM_REQUESTS, "input_len": 24, "output_len": 16, "seed": 0}},
            "grid": {"load.request_rate": list(RATES)}, "resources": {"num_cpus": 1},
        }
        (workdir / "grid.yaml").write_text(yaml.safe_dump(grid))
        # Ray reports custom metrics every 10 s by default; a short grid needs them sooner.
        env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_metrics_report_interval_ms="1000")
        submit = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(workdir / "grid.yaml"),
                                 "--results", str(workdir / "results")], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
        assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
        time.sleep(2)  # the last scrape

        def peak(metric: str) -> dict[tuple, float]:
            return _query(port, f'max_over_time({metric}{{experiment="prom"}}[30m])')

        trials = {dict(k)["state"]: v for k, v in peak("ray_orch_trials").items()}
        assert trials.get("running", 0) >= 1 and trials.get("done", 0) >= 1, trials
        for metric, upper in (("ray_orch_serving_output_tokens_per_s", 1e6), ("ray_orch_serving_requests_per_s", 1e4),
                              ("ray_orch_serving_kv_bytes_device", 2**30)):
            values = peak(metric)
            assert len(values) == len(RATES), (metric, values)  # one series per trial
            assert all(0 < v < upper for v in values.values()), (metric, values)
        counts = peak("ray_orch_serving_ttft_s_count")
        sums = peak("ray_orch_serving_ttft_s_sum")
        assert 0 < sum(counts.values()) <= NUM_REQUESTS * len(RATES), counts
        assert 0 < sum(sums.values()) / sum(counts.values()) < 30  # mean TTFT in seconds
        buckets = _query(port, 'max_over_time(ray_orch_serving_ttft_s_bucket{experiment="prom", le="+Inf"}[30m])')
        assert sum(buckets.values()) == sum(counts.values())
    finally:
        prometheus.terminate()
        prometheus.wait(30)

    # Live: the trials' runs got per-interval step metrics while they ran, beside the final ones.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("prom")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "orch.trial_id" in r.data.tags]
    assert len(runs) == len(RATES) and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "live/output_tokens_per_s")
        assert [m.step for m in history] == list(range(1, len(history) + 1)) and history, run.info.run_name
        assert max(m.value for m in history) > 0
        assert "ttft_ms_p99" in run.data.metrics  # the final summary, from Parquet
