"""Small trial kinds the core tests register by import path (``tests.support.kinds:ToyKind``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from workloads.kind import KindParams, TrialContext, TrialKind, TrialOutput

TOY_STEPS = pa.schema(
    [("step", pa.int64()), ("loss", pa.float64()), ("rank", pa.int64())], metadata={b"schema_version": b"1"}
)
TOY_SUMMARY = pa.schema(
    [("score", pa.float64()), ("steps", pa.int64()), ("pid", pa.int64()), ("opened", pa.int64())],
    metadata={b"schema_version": b"1"},
)


class ToyParams(KindParams):
    x: float = 1.0
    y: int = 0
    steps: int = Field(default=3, ge=0)
    sleep_s: float = 0.0
    fail: bool = False
    # Trials write their pid here and sleep, so a test can SIGKILL the worker mid-run.
    pid_file: str | None = None
    # Kill our own process on the first attempt (a worker crash), then succeed.
    crash_first_attempt: bool = False
    # Return an artifact that is text, not bytes (a kind's mistake the driver must survive).
    text_artifact: bool = False
    # A summary column beyond the declared schema, as a float or a list (types no cast reconciles).
    extra_column: Literal["none", "float", "list"] = "none"
    seed: int = 0


class ToyKind(TrialKind):
    """Computes score = x * 10 + y after sleeping; can fail, crash or be killed on demand."""

    name: ClassVar[str] = "toy"
    params_model: ClassVar[type[KindParams]] = ToyParams
    tables: ClassVar[dict[str, pa.Schema]] = {"toy_steps": TOY_STEPS, "toy_summary": TOY_SUMMARY}
    load_keys: ClassVar[frozenset[str]] = frozenset({"y", "sleep_s", "seed"})

    def open(self, params: KindParams) -> dict[str, Any]:
        return {"opened_at": time.time(), "pid": os.getpid(), "count": 0}

    def run(self, session: Any, params: KindParams, ctx: TrialContext) -> TrialOutput:
        assert isinstance(params, ToyParams)
        session["count"] += 1
        if params.crash_first_attempt and ctx.attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if params.pid_file:
            Path(params.pid_file).parent.mkdir(parents=True, exist_ok=True)
            Path(params.pid_file).write_text(f"{os.getpid()} {ctx.trial_id} {ctx.attempt}\n")
        time.sleep(params.sleep_s)
        if params.fail:
            raise RuntimeError(f"toy failure for x={params.x}")
        steps = pa.table({"step": list(range(params.steps)), "loss": [1.0 / (s + 1) for s in range(params.steps)],
                          "rank": [0] * params.steps})
        summary = pa.table({"score": [params.x * 10 + params.y], "steps": [params.steps], "pid": [os.getpid()],
                            "opened": [session["count"]]})
        if params.extra_column != "none":
            summary = summary.append_column("extra", pa.array([[1.5]] if params.extra_column == "list" else [1.5]))
        note: Any = "hello" if params.text_artifact else b"hello"
        return TrialOutput(tables={"toy_steps": steps, "toy_summary": summary}, artifacts={"note.txt": note})


class ToyWorkersParams(ToyParams):
    workers: int = 0


class ToyWorkersKind(ToyKind):
    """A ToyKind whose trials start workers the way Ray Train does: in a placement group they create themselves."""

    name: ClassVar[str] = "toy-workers"
    params_model: ClassVar[type[KindParams]] = ToyWorkersParams

    def actor_resources(self, params: KindParams, resources: dict[str, float]) -> dict[str, float]:
        return {"num_cpus": 0}

    def worker_bundles(self, params: KindParams, resources: dict[str, float]) -> list[dict[str, float]]:
        assert isinstance(params, ToyWorkersParams)
        return [dict(resources)] * params.workers

    def run(self, session: Any, params: KindParams, ctx: TrialContext) -> TrialOutput:
        import ray
        from ray.util import placement_group, remove_placement_group

        assert isinstance(params, ToyWorkersParams)
        group = placement_group([{"CPU": ctx.resources["num_cpus"]}] * params.workers)
        ray.get(group.ready())  # blocks while the cluster lacks room, like Ray Train's worker group
        try:
            return super().run(session, params, ctx)
        finally:
            remove_placement_group(group)
