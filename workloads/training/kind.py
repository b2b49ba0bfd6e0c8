"""The ``training`` trial kind: a Ray Train job per trial, three tables back."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import pyarrow as pa

from workloads.kind import KindParams, TrialContext, TrialKind, TrialOutput
from workloads.training.params import TrainingParams
from workloads.training.tables import TABLES, build_tables


class TrainingKind(TrialKind):
    """Distributed training with gradient compression (DESIGN.md "Training trials")."""

    name: ClassVar[str] = "training"
    params_model: ClassVar[type[KindParams]] = TrainingParams
    tables: ClassVar[dict[str, pa.Schema]] = TABLES
    # `orch report`: compressors side by side on bytes, time and quality.
    report_columns: ClassVar[dict[str, list[str]]] = {
        "train_summary": [
            "bytes_per_worker_step", "step_time_s", "final_ppl", "final_ppl_average", "final_accuracy",
            "final_divergence", "unigram_ppl", "time_to_target_s", "train_s",
            "comm_model_s_1gbit", "comm_model_s_10gbit", "comm_model_s_25gbit",
        ]
    }

    def actor_resources(self, params: KindParams, resources: dict[str, float]) -> dict[str, float]:
        """The trial actor only drives the trainer; the Train workers hold the resources."""
        return {"num_cpus": 0}

    def footprint(self, params: KindParams, resources: dict[str, float]) -> dict[str, float]:
        """num_workers x the grid's per-worker resources."""
        assert isinstance(params, TrainingParams)
        return {k: v * params.num_workers for k, v in resources.items()}

    def run(self, session: Any, params: KindParams, ctx: TrialContext) -> TrialOutput:
        """Train with Ray Train (resuming from the trial's checkpoints) and tabulate the ranks' rows."""
        from workloads.training.ray_train import fit

        assert isinstance(params, TrainingParams)
        start = time.perf_counter()
        states = fit(params, ctx.workdir, ctx.resources, ctx.report)
        tables = build_tables(params, states, time.perf_counter() - start)
        summary = tables["train_summary"].to_pylist()[0]
        ctx.report({k: float(v) for k, v in summary.items() if isinstance(v, int | float) and v is not None})
        return TrialOutput(tables=tables)
