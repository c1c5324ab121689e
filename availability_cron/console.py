"""Output for a person at a terminal: the live progress of a refresh, on stderr.

Part of the CLI layer (rich is imported here and in ``cli.py`` only, never by the core).
Nothing here writes to stdout, which carries the result; the CLI shows this display only
when stderr is a terminal, so cron's log never receives it.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

if TYPE_CHECKING:
    from .refresh import SweepProgress


class LiveProgress:
    """A progress bar on stderr fed by the sweep's ``on_progress``: done/planned, refreshed,
    errors. Use as a context manager; the instance is the callback.

    The bar appears on the first report (a skipped run shows none) and is removed on exit.
    While it shows, log records are printed above it instead of through it. The Console is
    created without forcing colour or a terminal, so rich honours ``NO_COLOR`` and
    ``TERM=dumb`` by itself.
    """

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._rerouted: list[logging.StreamHandler[Any]] = []
        self._stderr = sys.stderr

    def __enter__(self) -> LiveProgress:
        return self

    def __call__(self, progress: SweepProgress) -> None:
        if self._progress is None:
            self._begin(progress.planned)
        assert self._progress is not None and self._task is not None
        self._progress.update(self._task, total=progress.planned, completed=progress.done,
                              refreshed=progress.succeeded, errors=progress.failed)

    def _begin(self, planned: int) -> None:
        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("refresh"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("refreshed {task.fields[refreshed]}"),
            TextColumn("errors {task.fields[errors]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            redirect_stdout=False,  # stdout is the result's; never mix the display into it
            redirect_stderr=True,
        )
        self._task = self._progress.add_task("refresh", total=planned, refreshed=0, errors=0)
        self._stderr = sys.stderr
        # The log handler holds the real stderr: writing there would tear the bar. Its
        # lines go above the bar instead, verbatim and unwrapped.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._stderr:
                handler.setStream(_AboveTheBar(console))
                self._rerouted.append(handler)
        self._progress.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is None:
            return
        self._progress.stop()
        self._progress = None
        for handler in self._rerouted:
            handler.setStream(self._stderr)
        self._rerouted.clear()


class _AboveTheBar:
    """A text stream for a log handler: each line printed above the live display, as is (no
    markup, no highlighting, no wrapping: the terminal wraps a long line itself)."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def write(self, text: str) -> int:
        self._console.print(text, end="", soft_wrap=True, markup=False, highlight=False,
                            emoji=False)
        return len(text)

    def flush(self) -> None:
        self._console.file.flush()
