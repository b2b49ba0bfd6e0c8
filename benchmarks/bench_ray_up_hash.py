"""What `ray up` reads to hash cluster.yaml's file mounts: the project mounts against the whole checkout.

Run: ``python -m benchmarks.bench_ray_up_hash [--cold]`` from the checkout. Ray hashes every file
under every file mount (ray's ``hash_runtime_conf``) at each ``ray up`` and when the head's
autoscaler starts, whatever ``rsync_exclude`` says. The baseline, measured in the same run, is
one mount of the whole checkout (``~/orch: .``), venvs included. ``--cold`` drops the page cache
first (root only), as on the first ``ray up`` after a while.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

import yaml
from ray.autoscaler._private.util import hash_runtime_conf

REPO = Path(__file__).resolve().parent.parent


def _drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def time_hash(mounts: dict[str, str], salt: int, cold: bool) -> float:
    """Seconds Ray takes to hash ``mounts`` (a new salt each call: Ray caches by configuration)."""
    if cold:
        _drop_page_cache()
    start = time.perf_counter()
    hash_runtime_conf(mounts, None, {"benchmark": salt})
    return time.perf_counter() - start


def _size_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e9


def main() -> None:
    """Print both hash times and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (root)")
    args = parser.parse_args()
    if args.cold and os.geteuid() != 0:
        parser.error("--cold drops the page cache: run as root")
    os.chdir(REPO)  # cluster.yaml's mounts are relative to where `ray up` runs
    mounts = yaml.safe_load((REPO / "cluster.yaml").read_text())["file_mounts"]
    project = {remote: local for remote, local in mounts.items() if remote.startswith("~/orch")}
    checkout = {"~/orch": "."}
    print(f"machine: {platform.node()} ({os.cpu_count()} cores), checkout {_size_gb(REPO):.1f} GB, "
          f"{'cold' if args.cold else 'warm'} page cache")
    time_hash(checkout, 0, cold=False)  # warm-up (imports, and the cache for the warm case)
    whole = time_hash(checkout, 1, args.cold)
    ours = time_hash(project, 2, args.cold)
    print(f"{'mounts':<36}{'seconds':>10}")
    print(f"{'~/orch: . (baseline)':<36}{whole:>10.3f}")
    print(f"{'cluster.yaml project mounts':<36}{ours:>10.3f}")
    print(f"ratio baseline/ours: {whole / ours:.0f}x")


if __name__ == "__main__":
    main()
