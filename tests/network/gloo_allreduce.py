"""A gloo all-reduce of a known size between emulated hosts: ``python gloo_allreduce.py MASTER RANK WORLD NUMEL``.

Prints the median seconds of a few all-reduces and the interface's bytes sent during them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backends.network import interface_counters  # noqa: E402


def main() -> None:
    master, rank, world, numel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:29511", rank=rank, world_size=world)
    tensor = torch.ones(numel)
    dist.all_reduce(tensor)  # connections up before timing
    times, sent = [], []
    for _ in range(3):
        dist.barrier()
        tx0 = interface_counters("eth0")[0]
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
        sent.append(interface_counters("eth0")[0] - tx0)
    assert float(tensor[0]) == world ** 4
    print(sorted(times)[1], sorted(sent)[1], flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
