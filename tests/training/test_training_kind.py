"""The training kind's contract pieces without Ray: params, resources, tables, corpus split."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from workloads.registry import resolve_kind
from workloads.training.corpus import load_corpus, split_of
from workloads.training.kind import TrainingKind
from workloads.training.params import TrainingParams
from workloads.training.tables import TABLES, build_tables, comm_model_s


def test_kind_is_registered_and_holds_no_resources_itself() -> None:
    kind = resolve_kind("training")
    assert isinstance(kind, TrainingKind)
    params = kind.params_model.model_validate({"num_workers": 4, "steps": 10})
    assert kind.actor_resources(params, {"num_cpus": 2, "num_gpus": 1}) == {"num_cpus": 0}
    # without use_gpu, Ray Train's workers take no GPU (fit() drops it), so the footprint counts none
    assert kind.footprint(params, {"num_cpus": 2, "num_gpus": 1}) == {"num_cpus": 8}


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"compressor": {"name": "zip"}}, "allowed"),
        ({"compressor": {"name": "powersgd", "mode": "flat"}}, "hook"),
        ({"steps": 10, "epochs": 1}, "at most one"),
        ({"optim": {"name": "lbfgs"}}, "optim"),
        ({"compressor": {"name": "a2sgd", "residual": "both"}}, "residual"),
        ({"unknown": 1}, "unknown"),
        ({"workload": "rnn"}, "allowed: cnn, lstm"),
        ({"network": {"bandwidth_gbit": 1}, "use_gpu": True}, "use_gpu: false"),
        ({"network": {"bandwidth_gbit": 0}}, "bandwidth_gbit"),
        # what a worker would only find out when building the model, or would silently ignore
        ({"model": {"tied": True, "embed": 200}}, r"model.tied needs model.embed == model.hidden .*embed 200, hidden 650"),
        ({"workload": "cnn", "target_ppl": 100}, "workload 'cnn' reports no perplexity: set target_accuracy"),
        ({"target_ppl": 100, "target_accuracy": 0.5}, "at most one of target_ppl or target_accuracy"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters_are_rejected_with_the_key(bad: dict, where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        TrainingParams.model_validate(bad)


def test_a_workload_takes_only_the_keys_it_reads() -> None:
    # tied widths and the target are the lstm's; cnn takes its own target and ignores tied
    assert TrainingParams.model_validate({"workload": "cnn", "model": {"tied": True, "embed": 3},
                                          "target_accuracy": 0.8}).target_accuracy == 0.8
    assert TrainingParams.model_validate({"model": {"tied": True, "embed": 64, "hidden": 64}}).model.tied


def test_a_worker_share_without_a_single_step_fails_with_the_reason() -> None:
    from workloads.training.local import LocalEnv
    from workloads.training.loop import TrainingRun

    params = TrainingParams.model_validate({"workload": "cnn", "num_workers": 1, "batch_size": 100_000, "steps": 1})
    with pytest.raises(ValueError, match="training data holds no step: 1 workers x batch_size 100000"):
        TrainingRun(params, LocalEnv(0, 1, Path("/nonexistent")))


def _state(rank: int, sent: list[int]) -> dict:
    rows = [{"rank": rank, "step": i + 1, "epoch": 0, "loss": 5.0, "compute_s": 0.1, "compress_s": 0.0,
             "comm_s": 0.0, "decompress_s": 0.0, "optim_s": 0.0, "step_s": 0.2, "bytes_sent": b,
             "bytes_recv": b, "payload_bytes": 8, "samples_per_s": 10.0, "attempt": 0} for i, b in enumerate(sent)]
    evals = [{"step": len(sent), "split": s, "model": m, "loss": 4.0, "ppl": 54.6, "accuracy": 0.2,
              "divergence": 0.1, "train_s": 0.4} for s in ("valid", "test") for m in ("rank0", "average")]
    return {"rank": rank, "step": len(sent), "train_s": 0.4, "time_to_target_s": None, "step_rows": rows,
            "eval_rows": evals if rank == 0 else [], "restarts": [], "baseline": {"unigram_ppl": 300.0}}


def test_tables_follow_the_schemas_and_model_comm_time_from_the_busiest_worker() -> None:
    params = TrainingParams.model_validate({"compressor": {"name": "topk"}, "num_workers": 2, "steps": 2})
    tables = build_tables(params, [_state(0, [100, 300]), _state(1, [200, 100])], wall_s=3.0)
    for name, schema in TABLES.items():
        assert tables[name].schema.equals(schema, check_metadata=True)
    summary = tables["train_summary"].to_pylist()[0]
    assert summary["bytes_sent_total"] == 700 and summary["bytes_per_worker_step"] == 175
    assert summary["comm_model_s_10gbit"] == pytest.approx((200 + 300) * 8 / 10e9)
    assert summary["final_ppl"] == 54.6 and summary["unigram_ppl"] == 300.0 and summary["restarts"] == 0
    assert comm_model_s(tables["train_steps"].to_pylist(), 1) == pytest.approx(500 * 8 / 1e9)
    assert tables["train_steps"].num_rows == 4 and set(tables["train_steps"]["compressor"].to_pylist()) == {"topk"}


def test_corpus_split_and_vocabulary_are_as_documented() -> None:
    assert [split_of(i) for i in (0, 1, 2, 19, 20, 21)] == ["valid", "test", "train", "train", "valid", "test"]
    corpus = load_corpus(10_000)
    sizes = {s: len(corpus.ids[s]) for s in ("train", "valid", "test")}
    assert sizes == {"train": 734_709, "valid": 42_157, "test": 43_905}
    assert len(corpus.vocab) == 10_000 and corpus.vocab[:2] == ("<unk>", "<eos>")
    assert corpus.unigram_ppl("valid") == pytest.approx(354.5, abs=0.1)
    shuffled = corpus.shuffled_stream("train", seed=3)
    assert sorted(shuffled.tolist()) == sorted(corpus.stream("train").tolist())
