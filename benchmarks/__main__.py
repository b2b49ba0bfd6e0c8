"""`python -m benchmarks [NAME ...]`: run the benchmarks (all by default), each in its own process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))


def main() -> int:
    """Run the named benchmarks (default: all) with their default arguments; non-zero if any failed."""
    names = sys.argv[1:] or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; available: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"== {name} ==", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}"]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
