"""The real vLLM as the ``vllm`` backend, in one of two ways:

- in process (``transport: inprocess``): vLLM's ``AsyncLLM`` inside the trial's process, when
  ``vllm`` imports in the trial's environment (``vllm_inprocess.py``);
- as a server (``transport: http``): ``vllm serve`` as a subprocess (``vllm_server.py``).

``transport: auto`` (the default) is in process when vLLM imports here, else the server.
"""

from __future__ import annotations

import sys

from workloads.serving.params import ServingParams
from workloads.serving.systems.registry import SYSTEMS, SystemUnderTest
from workloads.serving.systems.vllm_base import vllm_importable
from workloads.serving.systems.vllm_inprocess import VLLMEngineSystem
from workloads.serving.systems.vllm_server import VLLMSystem


@SYSTEMS.register(name="vllm")
def open_vllm_system(params: ServingParams) -> SystemUnderTest:
    """The ``vllm`` backend: in process or a server, as ``params.transport`` says."""
    in_process = params.transport == "inprocess" or (params.transport == "auto" and vllm_importable())
    if not in_process:
        return VLLMSystem(params)
    if not vllm_importable():
        raise ValueError(
            f"backend 'vllm' with transport 'inprocess' needs vLLM importable by the trial's Python "
            f"({sys.executable}); run orch from an environment that has vLLM (e.g. .venv-vllm/bin/orch), "
            "or use transport 'http' (vllm serve from backend.python)"
        )
    return VLLMEngineSystem(params)
