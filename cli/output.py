"""Rendering for the command line: rich tables, JSON, and progress bars on stderr (only when it is a terminal).

Layer: cli. May import: click, rich (imported lazily, so ``thinpool --help`` stays fast).
"""

from __future__ import annotations

import json
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

    console = Console(file=click.get_text_stream("stdout"), soft_wrap=True,
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


class _RichProgress:
    def __init__(self, progress: Any, task: Any) -> None:
        self.progress = progress
        self.task = task

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def update(self, completed: int) -> None:
        self.progress.update(self.task, completed=completed)


@contextmanager
def progress(description: str, total: int, *, min_total: int = 1) -> Iterator[_NullProgress | _RichProgress]:
    """A progress bar on stderr when stderr is a terminal and the job is large (``total >= min_total``)."""
    if total < min_total or not sys.stderr.isatty():
        yield _NullProgress()
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                  console=Console(file=sys.stderr), transient=True) as p:
        yield _RichProgress(p, p.add_task(description, total=total))
