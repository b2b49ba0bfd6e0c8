"""The ``training`` trial kind: a Ray Train job per trial, three tables back."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import pyarrow as pa

from workloads.kind import KindParams, TrialContext, TrialKind, TrialOutput
from workloads.registry import KINDS
from workloads.training.params import TrainingParams, worker_resources
from workloads.training.tables import TABLES, build_tables


def run_name(ctx: TrialContext) -> str:
    """The trial's Ray Train run under a shared storage_path: ``<experiment>.<trial id>.<code>``, so
    that a rerun after a code change starts afresh instead of resuming older code's checkpoints
    (the trial's own folder is emptied for that by the orchestrator)."""
    code = ctx.code_version or "unknown"
    return f"{ctx.experiment}.{ctx.trial_id}.{code[:12]}{'-dirty' if code.endswith('-dirty') else ''}"


@KINDS.register
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

    def worker_bundles(self, params: KindParams, resources: dict[str, float]) -> list[dict[str, float]]:
        """One bundle per Ray Train worker: the grid's per-worker resources, with the GPU `use_gpu` adds."""
        assert isinstance(params, TrainingParams)
        return [worker_resources(params, resources)] * params.num_workers

    def check_cluster(self, params: KindParams, nodes: list[dict[str, float]]) -> None:
        """Several nodes: Ray Train's checkpoints need a storage_path that every node reaches."""
        assert isinstance(params, TrainingParams)
        if len(nodes) > 1 and params.storage_path is None and params.network is None:
            raise ValueError(
                f"training on a cluster of {len(nodes)} nodes needs storage_path (a folder every node mounts, "
                "or a URI such as s3://bucket/dir): Ray Train refuses a node-local folder once a worker on "
                "another node reports a checkpoint (docs/training.md)"
            )

    def check_host(self, params: KindParams) -> None:
        """A network trial builds namespaces and shaped links on the driver's host: root, tc, netem."""
        assert isinstance(params, TrainingParams)
        if params.network is not None:
            from backends.network import LinkShape, NetworkError, check_support

            try:
                check_support(LinkShape(**params.network.model_dump()))
            except NetworkError as exc:
                raise ValueError(f"network: {exc}") from None

    def run(self, session: Any, params: KindParams, ctx: TrialContext) -> TrialOutput:
        """Train with Ray Train (resuming from the trial's checkpoints) and tabulate the ranks' rows."""
        assert isinstance(params, TrainingParams)
        start = time.perf_counter()
        if params.network is not None:
            from workloads.training.emulated import fit_emulated

            states = fit_emulated(params, ctx.workdir, ctx.resources)
        else:
            from workloads.training.ray_train import fit

            states = fit(params, ctx.workdir, ctx.resources, run_name(ctx), ctx.report)
        from workloads.training.interconnect import LOG_FOLDER, nccl_paths

        paths = nccl_paths(ctx.workdir / LOG_FOLDER) if params.use_gpu else None
        tables = build_tables(params, states, time.perf_counter() - start, paths)
        summary = tables["train_summary"].to_pylist()[0]
        ctx.report({k: float(v) for k, v in summary.items() if isinstance(v, int | float) and v is not None})
        return TrialOutput(tables=tables)
