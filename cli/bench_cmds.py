"""`thinpool bench`: the device matrix, CoW lab, qcow2 peer, snapshot series and storage-driver lab, with
RESULTS.md and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

SUITE_PARTS = ("device", "goals", "snapshot", "cowlab", "qcow2")


QUICK_NOTE = ("thinpool bench: --quick measures short spans with few rounds: its numbers are noisy (ratios move "
              "by about 0.1 on a shared machine); use a full run for figures to quote")


@click.command("bench")
@click.option("--quick", is_flag=True, help="Smaller spans, sizes and counts (about a minute per part).")
@click.option("--only", "parts", multiple=True, type=click.Choice([*SUITE_PARTS, "scale", "nbd", "drivers"]),
              help="Run only these parts (repeatable). Default: all but scale, nbd and drivers. `nbd`: fio over "
                   "NBD (QD16) against nbdkit's memory plugin and qemu-nbd + qcow2 (RESULTS-nbd.md). `drivers` is the "
                   "storage-driver lab: thinpool-devicemapper, overlayfs, btrfs, vfs and aufs-like on one image (root "
                   "for the kernel drivers). `scale` measures 1 GiB..8 TiB pools, 10k..4M mappings (with the C++ "
                   "thin_* tools) and 1..10,000 devices (RESULTS-scale.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON on stdout.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path), help="Write PNG plots here.")
@click.option("--results", "results", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a RESULTS.md (and RESULTS.json / RESULTS-drivers.json beside it).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where to put scratch pools (default: $TMPDIR).")
def bench(quick: bool, parts: tuple[str, ...], as_json: bool, png_dir: Path | None, results: Path | None,
          workdir: str | None) -> None:
    """Measure thinpool against a raw sparse file (and qcow2, copy-up, overlayfs, btrfs, vfs) in one run.

    Example: thinpool bench --only drivers --quick --results benchmarks/RESULTS.md --png benchmarks/results
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    chosen = parts or SUITE_PARTS
    suite_parts = [p for p in chosen if p != "drivers"]
    run = lab = None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True,
                  disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task("starting", total=None)

        def progress(msg: str) -> None:
            prog.update(task, description=msg)

        if quick:
            click.echo(QUICK_NOTE, err=True)
        if suite_parts:
            from thinpool_bench import suite

            run = suite.run_all(quick=quick, parts=suite_parts, workdir=workdir, progress=progress)
        if "drivers" in chosen:
            from thinpool_bench.lab import run_lab

            lab = run_lab(quick=quick, workdir=workdir, progress=progress)
    _report(run, lab, as_json, png_dir, results)


def _report(run: object, lab: dict[str, object] | None, as_json: bool, png_dir: Path | None,
            results: Path | None) -> None:
    from thinpool_bench import suite
    from thinpool_bench.lab import report

    if results is not None:
        if run is not None:
            suite.write_results(run, results, png_dir)  # type: ignore[arg-type]
        if lab is not None:
            report.write(lab, results, png_dir)
    elif png_dir is not None:
        if run is not None:
            suite.plot(run, png_dir)  # type: ignore[arg-type]
        if lab is not None:
            report.plot(lab, png_dir)
    if as_json:
        doc = lab if run is None else run.to_dict() if lab is None else {"suite": run.to_dict(), "drivers": lab}  # type: ignore[attr-defined]
        click.echo(json.dumps(doc, indent=1, default=str))
        return
    if run is not None:
        for c in suite.claims(run):  # type: ignore[arg-type]
            click.echo(f"{c['verdict']:>13}  {c['measured']:>12}  {c['claim']}")
    if lab is not None:
        for name, d in lab["drivers"].items():  # type: ignore[attr-defined]
            state = d.get("unavailable") or d.get("error") or "measured"
            click.echo(f"{name:>18}  {state}")
        for c in report.claims(lab):
            click.echo(f"{c['verdict']:>22}  {c['claim']}")
    if results is not None:
        click.echo(f"wrote {results}")
