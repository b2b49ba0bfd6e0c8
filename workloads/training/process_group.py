"""How Ray Train's workers form their torch.distributed group: on loopback when the cluster is.

Ray Train's own setup rendezvouses through a ``TCPStore`` that rank 0 hosts on every interface
(``::``), and gloo listens on the address the host name resolves to: both are reachable from the
network during every training trial, also on an embedded single-host Ray whose own traffic is
kept on 127.0.0.1. When every worker's node address is a loopback address (the embedded
default), the group is formed instead through a ``FileStore`` in the trial's folder (nothing
listens for the rendezvous) and gloo / NCCL are told to use the loopback interface. On a real
cluster Ray Train's own setup runs, with gloo on the interface that carries the node's Ray
address: the host name may resolve to 127.0.0.1 (many /etc/hosts do), and gloo would then
bind to loopback, which the other hosts cannot reach.

Either way each worker first takes the trial's NCCL environment (``env``: the interconnect's
variables, workloads/training/interconnect.py), before its process group exists.
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from dataclasses import dataclass, field

import psutil
import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

from workloads.training.interconnect import apply_env

LOOPBACK_INTERFACE = "lo"


def _node_address() -> str:
    return ray.util.get_node_ip_address()


def _use_loopback() -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = LOOPBACK_INTERFACE
    os.environ["NCCL_SOCKET_IFNAME"] = LOOPBACK_INTERFACE


def _use_node_interface() -> None:
    """gloo on the interface holding this node's Ray address, unless the user chose one."""
    address = _node_address()
    for name, entries in psutil.net_if_addrs().items():
        if any(entry.address == address for entry in entries):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            return


class _LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend, with the loopback-only rendezvous on a single-host cluster."""

    def on_start(self, worker_group, backend_config: LoopbackTorchConfig) -> None:  # noqa: ANN001 - Ray's type
        """Form the process group over a FileStore and loopback sockets when every node is loopback."""
        worker_group.execute(apply_env, backend_config.env)
        addresses = worker_group.execute(_node_address)
        if not all(ipaddress.ip_address(a).is_loopback for a in addresses):
            worker_group.execute(_use_node_interface)
            super().on_start(worker_group, backend_config)
            return
        os.makedirs(backend_config.store_dir, exist_ok=True)
        # A fresh file per start: a restarted worker group must not meet the old group's keys.
        store = f"file://{os.path.join(backend_config.store_dir, 'pg-' + uuid.uuid4().hex)}"
        worker_group.execute(_use_loopback)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank, _setup_torch_process_group, backend=backend_config.backend or "gloo", world_rank=rank,
                    world_size=len(worker_group), init_method=store, timeout_s=backend_config.timeout_s,
                )
                for rank in range(len(worker_group))
            ]
        )


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose group binds to loopback on a single-host cluster; ``store_dir`` holds
    the rendezvous file (a folder of the trial); ``env`` is set in every worker before the group forms."""

    store_dir: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        """The loopback-aware backend."""
        return _LoopbackTorchBackend
