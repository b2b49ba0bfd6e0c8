"""The training grid's ``interconnect`` key: validation, the NCCL environment it maps to, NCCL's log,
and the GPU-aware span timer of the overlapped hooks (its CPU path)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from backends.compression.sync import Span
from orchestrator.cli import main
from orchestrator.expand import expand
from orchestrator.spec import load_spec
from tests.conftest import REPO
from workloads.registry import resolve_kind
from workloads.training.interconnect import apply_env, channel_paths, nccl_env, nccl_paths, seen_env

SOCKETS = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1", "NCCL_NVLS_ENABLE": "0"}


def _validate(tmp_path: Path, base: dict, grid: dict) -> tuple[int, str]:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"experiment": "ic", "kind": "training", "base": {"steps": 2, **base}, "grid": grid}))
    result = CliRunner().invoke(main, ["validate", str(path)])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "base, grid, expected",
    [
        ({"use_gpu": True}, {"interconnect": ["nvlink", "infiniband"]}, "interconnect: Input should be 'auto', 'nvlink' or 'sockets'"),
        ({}, {"interconnect": ["nvlink"]}, "interconnect: nvlink needs use_gpu: true"),
        ({"network": {"bandwidth_gbit": 1}}, {"interconnect": ["sockets"]}, "network trials use their emulated links"),
    ],
)
def test_a_bad_interconnect_is_one_line_naming_the_key(tmp_path: Path, base: dict, grid: dict, expected: str) -> None:
    code, output = _validate(tmp_path, base, grid)
    assert code != 0
    lines = output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], output
    assert "Traceback" not in output


def test_the_multigpu_grid_runs_every_compressor_over_both_interconnects() -> None:
    spec = load_spec(REPO / "grids" / "a2sgd-multigpu.yaml")
    trials = expand(spec, resolve_kind("training"))
    pairs = {(t.params["interconnect"], t.params["compressor"]["name"]) for t in trials}
    compressors = {"dense", "fp16", "topk", "qsgd", "powersgd", "a2sgd"}
    assert pairs == {(i, c) for i in ("nvlink", "sockets") for c in compressors}
    assert len(trials) == 12 and {t.params["use_gpu"] for t in trials} == {True}
    assert {t.resources.get("num_gpus") for t in trials} == {1.0}


def test_each_interconnect_maps_to_its_nccl_variables_with_multicast_off(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NCCL_DEBUG", raising=False)
    assert nccl_env("sockets") == SOCKETS
    assert nccl_env("auto") == {"NCCL_NVLS_ENABLE": "0"}
    assert nccl_env("nvlink") == {"NCCL_NVLS_ENABLE": "0", "NCCL_P2P_LEVEL": "NVL"}
    logged = nccl_env("auto", tmp_path)
    assert logged["NCCL_DEBUG"] == "INFO" and logged["NCCL_DEBUG_FILE"] == str(tmp_path / "nccl.%h.%p.log")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")  # the user's own level wins: no log of ours
    assert "NCCL_DEBUG_FILE" not in nccl_env("auto", tmp_path)


def test_a_reused_worker_loses_the_previous_interconnects_variables(monkeypatch) -> None:
    for key in ("NCCL_P2P_LEVEL", *SOCKETS):
        monkeypatch.delenv(key, raising=False)
    apply_env(nccl_env("sockets"))
    assert seen_env() == "NCCL_IB_DISABLE=1,NCCL_NVLS_ENABLE=0,NCCL_P2P_DISABLE=1,NCCL_SHM_DISABLE=1"
    apply_env(nccl_env("nvlink"))
    assert seen_env() == "NCCL_NVLS_ENABLE=0,NCCL_P2P_LEVEL=NVL"


NCCL_LOG = """\
h200:1234:1300 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read
h200:1234:1300 [0] NCCL INFO Channel 01/0 : 0[0] -> 1[1] via P2P/CUMEM/read
h200:1234:1300 [0] NCCL INFO Connected all rings, use ring PXN 0 GDR 1
h200:1235:1301 [1] NCCL INFO Channel 00/0 : 1[1] -> 0[0] [send] via NET/Socket/0
h200:1235:1301 [1] NCCL INFO Channel 00/0 : 0[0] -> 1[1] [receive] via NET/Socket/0
h200:1235:1301 [1] NCCL INFO Channel 02/0 : 1[1] -> 0[0] via SHM/direct/direct
"""


def test_the_transports_nccl_used_are_read_from_its_channel_lines(tmp_path: Path) -> None:
    assert channel_paths(NCCL_LOG.splitlines()) == {"P2P/CUMEM", "NET/Socket", "SHM/direct"}
    assert nccl_paths(tmp_path / "absent") is None
    (tmp_path / "nccl.h200.1234.log").write_text(NCCL_LOG.splitlines()[0] + "\n")
    (tmp_path / "nccl.h200.1235.log").write_text(NCCL_LOG.splitlines()[3] + "\n")
    assert nccl_paths(tmp_path) == "NET/Socket,P2P/CUMEM"


def test_a_span_runs_from_the_first_mark_to_the_last() -> None:
    span, cpu = Span(), torch.device("cpu")
    span.mark(cpu)
    assert span.take() == 0.0  # one mark is no span
    span.mark(cpu)
    time.sleep(0.02)
    span.mark(cpu)
    time.sleep(0.03)
    span.mark(cpu)
    taken = span.take()
    assert 0.05 <= taken < 1.0
    assert span.take() == 0.0  # taking starts afresh
