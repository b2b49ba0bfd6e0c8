"""Trace replay: arrival times and lengths read from a JSONL file.

One JSON object per line:
    {"arrival_s": 0.25, "input_len": 312, "output_len": 64}
``timestamp`` is accepted for ``arrival_s``. A line may carry its own prompt as
``prompt_token_ids`` (list of ints) or ``prompt`` (text, tokenized by the system's tokenizer);
otherwise the prompt comes from the load's prompt source with ``input_len`` tokens.
Lines are replayed in time order, shifted so that the first request is sent at t = 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TraceEntry:
    """One request of a trace."""

    arrival_s: float
    input_len: int
    output_len: int
    prompt_token_ids: list[int] | None = None
    prompt: str | None = None


def _entry(obj: dict, where: str) -> TraceEntry:
    arrival = obj.get("arrival_s", obj.get("timestamp"))
    if arrival is None or "output_len" not in obj:
        raise ValueError(f"{where}: needs 'arrival_s' (or 'timestamp') and 'output_len'; got keys {sorted(obj)}")
    ids = obj.get("prompt_token_ids")
    if ids is None and "input_len" not in obj and "prompt" not in obj:
        raise ValueError(f"{where}: needs 'input_len', 'prompt_token_ids' or 'prompt'")
    input_len = len(ids) if ids is not None else int(obj.get("input_len", 0))
    return TraceEntry(
        arrival_s=float(arrival),
        input_len=input_len,
        output_len=int(obj["output_len"]),
        prompt_token_ids=[int(t) for t in ids] if ids is not None else None,
        prompt=obj.get("prompt"),
    )


def read_trace(path: str | Path) -> list[TraceEntry]:
    """Entries of a JSONL trace, sorted by arrival and shifted to start at t = 0."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {str(path)!r} does not exist")
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            entries.append(_entry(json.loads(line), f"{path}:{lineno}"))
    if not entries:
        raise ValueError(f"trace file {str(path)!r} has no requests")
    entries.sort(key=lambda e: e.arrival_s)
    start = entries[0].arrival_s
    return [
        TraceEntry(e.arrival_s - start, e.input_len, e.output_len, e.prompt_token_ids, e.prompt) for e in entries
    ]
