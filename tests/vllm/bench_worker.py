"""``vllm bench serve`` run several times in one process of vLLM's venv (tests/vllm/bench_client.py).

Importing vLLM takes ~18 s on a 2-core host, more than a cross-check run itself; here it is paid
once. Each run is vLLM's own entry (``vllm.benchmarks.serve.main``, what the CLI calls) with the
command's flags. One JSON line per run on stdin: ``{"args": [...], "log": path, "done": path}``;
the run's output (prints and vLLM's logging, file descriptors 1 and 2) goes to ``log``, and its
exit code is written to ``done`` (atomically) when it ends. Run with ``python -u`` (the client watches ``log``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser


def run(args: list[str], log: str) -> int:
    """One ``vllm bench serve`` with ``args``, its output in ``log``: 0 when it finished."""
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    # At the descriptor level: vLLM's logging handlers hold the streams they were configured with.
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        main(parser.parse_args(args))
        return 0
    except BaseException:  # noqa: BLE001 - argparse's SystemExit too: the client reads the log
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (fd, *saved):
            os.close(descriptor)


if __name__ == "__main__":
    for line in sys.stdin:
        request = json.loads(line)
        code = run(request["args"], request["log"])
        # Written whole, then renamed: the client polls for the file and reads it at once.
        partial = request["done"] + ".partial"
        with open(partial, "w") as done:
            done.write(str(code))
        os.replace(partial, request["done"])
