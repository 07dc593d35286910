"""Rendering for the command line: rich tables, JSON, and progress bars on stderr (only when it is a terminal).

Layer: cli. May import: click, rich (imported lazily, so ``thinpool --help`` stays fast).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
          right: Sequence[str] = ()) -> None:
    """Print a rich table to stdout (plain ASCII-safe box when stdout is not a terminal)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, soft_wrap=True,
                      width=None if sys.stdout.isatty() else 200)
    t = Table(title=title, box=box.SIMPLE_HEAD if console.is_terminal else box.ASCII2, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", no_wrap=True)
    for r in rows:
        t.add_row(*(str(v) for v in r))
    console.print(t)


def kv_table(title: str | None, items: Sequence[tuple[str, Any]]) -> None:
    table(title, ["field", "value"], [(k, v) for k, v in items])


class _NullProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, completed: int) -> None:
        pass


PROGRESS_DELAY_ENVVAR = "THINPOOL_PROGRESS_DELAY"
PROGRESS_DELAY_S = 1.0  # a job still running after this long gets a bar, however small its total


class _LazyProgress:
    """Counts progress, and starts a rich bar once the job has run ``delay`` seconds (or at once when large)."""

    def __init__(self, description: str, total: int, delay: float) -> None:
        import time

        self.description, self.total, self.delay = description, total, delay
        self.completed = 0
        self._t0 = time.monotonic()
        self._clock = time.monotonic
        self._bar: Any = None
        self._task: Any = None
        if delay <= 0:
            self._start()

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        # stdout is redirected through the bar's console (so that lines printed meanwhile land above the bar)
        # only when it is a terminal too: output to a file or a pipe keeps its bytes (rich would send them to
        # stderr); soft_wrap: a redirected long line is not cut at the terminal's width
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                             TimeRemainingColumn(), console=Console(file=sys.stderr, soft_wrap=True),
                             transient=True, redirect_stdout=sys.stdout.isatty())
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self.total, completed=self.completed)

    def _tick(self) -> None:
        if self._bar is None:
            if self._clock() - self._t0 < self.delay:
                return
            self._start()
        self._bar.update(self._task, completed=self.completed)

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self._tick()

    def update(self, completed: int) -> None:
        self.completed = completed
        self._tick()

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _progress_delay() -> float:
    try:
        return max(float(os.environ.get(PROGRESS_DELAY_ENVVAR, PROGRESS_DELAY_S)), 0.0)
    except ValueError:
        return PROGRESS_DELAY_S


@contextmanager
def progress(description: str, total: int, *, min_total: int = 1,
             at_once: bool | None = None) -> Iterator[_NullProgress | _LazyProgress]:
    """A progress bar on stderr when stderr is a terminal: at once for a large job (``total >= min_total``, or
    ``at_once`` when given: for a bar whose unit is not the one the size threshold counts), else as soon as the
    job has taken more than a second ($THINPOOL_PROGRESS_DELAY seconds)."""
    if not sys.stderr.isatty() or total <= 0:
        yield _NullProgress()
        return
    big = total >= min_total if at_once is None else at_once
    bar = _LazyProgress(description, total, 0.0 if big else _progress_delay())
    try:
        yield bar
    finally:
        bar.stop()
