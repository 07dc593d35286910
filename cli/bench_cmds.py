"""`thinpool bench`: the device matrix, CoW lab, qcow2 peer and snapshot series, with RESULTS.md and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command("bench")
@click.option("--quick", is_flag=True, help="Smaller spans and fewer sizes (about a minute).")
@click.option("--only", "parts", multiple=True,
              type=click.Choice(["device", "goals", "snapshot", "cowlab", "qcow2"]),
              help="Run only these parts (repeatable). Default: all.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON on stdout.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path), help="Write PNG plots here.")
@click.option("--results", "results", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a RESULTS.md (and RESULTS.json beside it).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where to put scratch pools (default: $TMPDIR).")
def bench(quick: bool, parts: tuple[str, ...], as_json: bool, png_dir: Path | None, results: Path | None,
          workdir: str | None) -> None:
    """Measure thinpool against a raw sparse file (and qcow2, copy-up, overlayfs) in one run.

    Example: thinpool bench --quick --results benchmarks/RESULTS.md --png benchmarks/results
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from thinpool_bench import suite as b

    chosen = parts or ("device", "goals", "snapshot", "cowlab", "qcow2")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True,
                  disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task("starting", total=None)
        run = b.run_all(quick=quick, parts=chosen, workdir=workdir,
                        progress=lambda msg: prog.update(task, description=msg))
    if results is not None:
        b.write_results(run, results, png_dir)
    elif png_dir is not None:
        b.plot(run, png_dir)
    if as_json:
        click.echo(json.dumps(run.to_dict(), indent=1))
        return
    for c in b.claims(run):
        click.echo(f"{c['verdict']:>13}  {c['measured']:>12}  {c['claim']}")
    if results is not None:
        click.echo(f"wrote {results}")
