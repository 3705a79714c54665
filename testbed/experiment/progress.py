"""The run's progress on stderr: a bar (rich) on a terminal, one line per case otherwise.

The bar counts estimated seconds rather than cases, so the ETA stays right when cases of
different lengths follow each other (a cluster build, a 1 s warm-up, a 10 s stream). A log
file or CI (stderr not a terminal) gets a plain line per case with the same counts, so that
a long run never stays silent.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(max(seconds, 0)), 60)
    return f"{minutes}:{rest:02d}"


def progress_line(
    done: int, cases: int, elapsed: float, remaining: float, text: str, status: str
) -> str:
    """`[3/24 0:41 ETA 5:10] inpod hbone cross-node tcp_rr msg_size=64 rep 1: ok`."""
    return f"[{done}/{cases} {_clock(elapsed)} ETA {_clock(remaining)}] {text}: {status}"


class RunProgress:
    def __init__(
        self,
        total_seconds: float,
        cases: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self._stream = stream or sys.stderr
        console = Console(file=self._stream)
        self._lines = enabled and not console.is_terminal
        self._progress = Progress(
            TextColumn("[bold]{task.fields[done]}/{task.fields[cases]}[/] cases"),
            BarColumn(bar_width=20),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
            disable=not enabled or self._lines,
        )
        self._task: TaskID = self._progress.add_task("", total=total_seconds, done=0, cases=cases)
        self._done = 0
        self._cases = cases
        self._total = total_seconds
        self._estimated_done = 0.0
        self._started = time.monotonic()
        self._text = ""

    def __enter__(self) -> RunProgress:
        if not self._lines:  # a stopped rich display still ends with a newline
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._lines:
            self._progress.stop()

    def describe(self, text: str) -> None:
        self._text = text
        self._progress.update(self._task, description=text)

    def extend(self, seconds: float, *, cases: int) -> None:
        """More work than planned: an extra repetition (repetitions: auto)."""
        self._cases += cases
        self._total += seconds
        self._progress.update(self._task, total=self._total, cases=self._cases)

    def advance(self, seconds: float, *, cases: int, status: str = "") -> None:
        self._done += cases
        self._estimated_done += seconds
        self._progress.update(self._task, advance=seconds, done=self._done)
        if self._lines and cases:
            elapsed = time.monotonic() - self._started
            # the estimate scaled by how fast the run has gone so far
            pace = elapsed / self._estimated_done if self._estimated_done else 1.0
            remaining = (self._total - self._estimated_done) * pace
            line = progress_line(
                self._done, self._cases, elapsed, remaining, self._text, status or "done"
            )
            print(line, file=self._stream, flush=True)
