"""Terminal progress of a submission: a live line on a TTY, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text


class Progress(Protocol):
    """Receives a submission's progress (terminal display, logs, tests)."""

    def update(self, counts: dict[str, int], elapsed_s: float, eta_s: float | None) -> None: ...

    def event(self, message: str) -> None: ...


class SilentProgress:
    """Progress sink that shows nothing."""

    def update(self, counts: dict[str, int], elapsed_s: float, eta_s: float | None) -> None:
        """Ignore."""

    def event(self, message: str) -> None:
        """Ignore."""


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def status_line(counts: dict[str, int], elapsed_s: float, eta_s: float | None) -> str:
    """'done 3 | running 2 | failed 0 | queued 7 | elapsed 00:12 | eta 00:30' (timeout, cancelled when any)."""
    # Cancelled or timed-out trials are not failures of the system under test: name them apart.
    others = "".join(f" | {state} {counts[state]}" for state in ("timeout", "cancelled") if counts.get(state))
    return (
        f"done {counts.get('done', 0)} | running {counts.get('running', 0)} | failed {counts.get('failed', 0)}"
        f"{others} | queued {counts.get('queued', 0)} | elapsed {_clock(elapsed_s)} | eta {_clock(eta_s)}"
    )


class TerminalProgress:
    """Shows the status line live on a TTY; on a pipe, prints events and a status line every ``every_s``."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 10.0):
        self.stream = stream or sys.stdout
        self.console = Console(file=self.stream)
        self.live: Live | None = None
        if self.stream.isatty():
            self.live = Live(Text(""), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        self.every_s = every_s
        self._last_print = 0.0
        self._last_line = ""

    def update(self, counts: dict[str, int], elapsed_s: float, eta_s: float | None) -> None:
        """Refresh the status line."""
        line = status_line(counts, elapsed_s, eta_s)
        if self.live is not None:
            self.live.update(Text(line))
        elif time.time() - self._last_print >= self.every_s and line != self._last_line:
            print(line, file=self.stream, flush=True)
            self._last_print, self._last_line = time.time(), line

    def event(self, message: str) -> None:
        """Print one event (a trial finished, a retry, a warning)."""
        if self.live is not None:
            self.live.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)

    def close(self, counts: dict[str, int], elapsed_s: float) -> None:
        """Final status line."""
        if self.live is not None:
            self.live.update(Text(status_line(counts, elapsed_s, 0)))
            self.live.stop()
        else:
            print(status_line(counts, elapsed_s, 0), file=self.stream, flush=True)
