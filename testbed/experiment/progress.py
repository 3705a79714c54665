"""The run's progress bar (rich), on stderr.

The bar counts estimated seconds rather than cases, so the ETA stays right when cases of
different lengths follow each other (a cluster build, a 1 s warm-up, a 10 s stream).
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RunProgress:
    def __init__(self, total_seconds: float, cases: int, *, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.fields[done]}/{task.fields[cases]}[/] cases"),
            BarColumn(bar_width=20),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self._task: TaskID = self._progress.add_task("", total=total_seconds, done=0, cases=cases)
        self._done = 0

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def describe(self, text: str) -> None:
        self._progress.update(self._task, description=text)

    def advance(self, seconds: float, *, cases: int) -> None:
        self._done += cases
        self._progress.update(self._task, advance=seconds, done=self._done)
