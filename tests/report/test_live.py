"""Live records: what trials report while they run and the Ray metrics those records feed."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator import telemetry
from orchestrator.live import LiveReporter
from workloads.serving.live import IntervalMonitor
from workloads.serving.transports.base import RequestRecord


@dataclass
class FakeMetric:
    calls: list[tuple[str, float, dict]] = field(default_factory=list)

    def set(self, value: float, tags: dict) -> None:
        self.calls.append(("set", value, tags))

    def observe(self, value: float, tags: dict) -> None:
        self.calls.append(("observe", value, tags))


@pytest.fixture
def fake_metrics(monkeypatch) -> dict[str, FakeMetric]:
    made: dict[str, FakeMetric] = {}
    monkeypatch.setattr(telemetry, "_metric", lambda name: made.setdefault(name, FakeMetric()))
    return made


def test_record_keys_feed_their_metrics(fake_metrics: dict[str, FakeMetric]) -> None:
    trial = telemetry.TrialTelemetry("exp", "t-0")
    trial.observe({"bytes_sent": 8, "step_s": 0.25, "loss": 3.0, "ttft_s": [0.1, 0.3], "kv_bytes_device": None})
    tags = {"experiment": "exp", "trial_id": "t-0"}
    assert fake_metrics["orch_train_bytes_per_step"].calls == [("set", 8.0, tags)]
    assert fake_metrics["orch_train_step_time_s"].calls == [("observe", 0.25, tags)]
    assert fake_metrics["orch_serving_ttft_s"].calls == [("observe", 0.1, tags), ("observe", 0.3, tags)]
    assert fake_metrics["orch_serving_kv_bytes_device"].calls == []


def test_driver_counts_drop_to_zero_when_a_state_empties(fake_metrics: dict[str, FakeMetric]) -> None:
    driver = telemetry.Telemetry("exp")
    driver.update({"running": 2})
    driver.update({"done": 2})
    calls = fake_metrics["orch_trials"].calls
    assert ("set", 0, {"experiment": "exp", "state": "running"}) in calls
    assert calls[-1] == ("set", 2, {"experiment": "exp", "state": "done"})


class FakeTransport:
    def __init__(self) -> None:
        self.records = [RequestRecord(f"r{i}", arrival_s=0.0, send_s=0.0) for i in range(3)]
        self.steps: list[dict] = []

    def live_records(self) -> list[RequestRecord]:
        return self.records

    def engine_steps(self) -> list[dict]:
        return self.steps


def test_interval_monitor_reports_per_interval_changes() -> None:
    transport, reported = FakeTransport(), []
    monitor = IntervalMonitor(transport, lambda record, step=None: reported.append((step, record)))
    first, second = transport.records[:2]
    first.first_token_s, first.token_times_s = 0.2, [0.2, 0.3, 0.4]
    first.finish_s = 0.4
    second.first_token_s, second.token_times_s = 0.5, [0.5]
    transport.steps += [{"kv_bytes_device": 4096, "kv_bytes_host": 0}, {"kv_bytes_device": 0, "kv_bytes_host": 0}]
    monitor.tick(0.5)
    transport.steps.append({"kv_bytes_device": 1024, "kv_bytes_host": 0})
    second.token_times_s += [0.6, 0.7]
    second.finish_s = 0.7
    monitor.tick(0.5)
    (step1, one), (step2, two) = reported
    assert (step1, step2) == (1, 2)
    assert one["requests_per_s"] == pytest.approx(2.0) and one["output_tokens_per_s"] == pytest.approx(8.0)
    assert one["ttft_s"] == pytest.approx([0.2, 0.5]) and one["kv_bytes_device"] == 4096
    # Only what changed: the second request finished with two more tokens; no new first token.
    assert two["requests_per_s"] == pytest.approx(2.0) and two["output_tokens_per_s"] == pytest.approx(4.0)
    assert two["ttft_s"] == [] and "ttft_ms_mean" not in two and two["completed"] == 2
    assert two["kv_bytes_device"] == 1024  # the peak of this interval's steps only


def test_streamed_requests_count_done_only_when_finished_and_chunks_by_their_tokens() -> None:
    # the asyncio transports (HTTP, vLLM in process) fill records chunk by chunk through add_arrival
    transport, reported = FakeTransport(), []
    monitor = IntervalMonitor(transport, lambda record, step=None: reported.append(record))
    streaming, multi = transport.records[:2]
    streaming.add_arrival(0.1, [5])
    multi.add_arrival(0.1, [1, 2, 3, 4])  # one chunk of four tokens
    record = monitor.tick(1.0)
    assert record["completed"] == 0 and record["requests_per_s"] == 0.0  # still streaming
    assert record["output_tokens_per_s"] == pytest.approx(5.0)


def test_reporter_pickles_without_its_connections() -> None:
    reporter = LiveReporter("exp", "t-0", None)
    reporter({"loss": 1.0}, step=1)  # no sink: nothing buffered, no Ray needed
    copy = pickle.loads(pickle.dumps(reporter))
    assert (copy.experiment, copy.trial_id, copy.sink_name) == ("exp", "t-0", None) and copy._buffer == []


def test_training_loop_reports_every_step_and_evaluation(tmp_path: Path) -> None:
    import torch.distributed as dist

    from workloads.training.local import LocalEnv
    from workloads.training.loop import run_worker
    from workloads.training.params import TrainingParams

    params = TrainingParams.model_validate({
        "workload": "lstm", "num_workers": 1, "steps": 6, "batch_size": 4, "bptt": 5, "eval_every": 3, "eval_batches": 1,
        "model": {"embed": 8, "hidden": 8, "layers": 1, "dropout": 0.0, "vocab_size": 200}, "compressor": {"name": "topk"},
    })
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        env = LocalEnv(0, 1, tmp_path / "ckpt")
        reported: list[tuple[int, dict]] = []
        env.report = lambda record, step=None: reported.append((step, record))
        run_worker(params, env)
    finally:
        dist.destroy_process_group()
    steps = [(s, r) for s, r in reported if "step_s" in r]
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["step_s"] > 0 and r["loss"] > 0 and "rank" not in r for _, r in steps)
    evals = [(s, r) for s, r in reported if "valid.rank0.loss" in r]
    assert [s for s, _ in evals] == [3, 6] and all(r["valid.rank0.ppl"] > 1 for _, r in evals)


def test_open_loop_transports_expose_records_while_the_load_runs() -> None:
    import asyncio

    from workloads.serving.transports.base import RequestSpec
    from workloads.serving.transports.open_loop import run_open_loop

    live: list[RequestRecord] = []
    seen_during: list[bool] = []

    async def send(spec: RequestSpec, t0: float, record: RequestRecord) -> None:
        record.send_s = record.first_token_s = 0.0
        record.token_times_s.append(0.0)
        record.output_tokens = 1
        seen_during.append(any(r is record for r in live))  # what the transports' monitor reads
        await asyncio.sleep(0)

    specs = [RequestSpec(request_id=f"r{i}", arrival_s=0.01 * i, prompt_token_ids=[1, 2], max_tokens=1) for i in range(3)]
    records = asyncio.run(run_open_loop(specs, None, send, live=live))
    assert live == records and seen_during == [True, True, True]
