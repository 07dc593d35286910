"""thin_ls, thin_delta and thin_rmap as commands: `thinpool ls`, `thinpool delta`, `thinpool rmap`.

Layer: cli. May import: click, thinpool (the library, ``thinpool.tools``, only inside the commands).

The text output is byte for byte that of thin-provisioning-tools 0.9.0; the work is done by ``thinpool.tools``.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from thinpool_cli.ls_fast import LS_PARAMS, ls_details_text, write_all
from thinpool_cli.params import F, json_option, metadata_path, parse_region, pool_option
from thinpool_cli.tools_common import (
    mapping_progress,
    node_progress,
    open_metadata,
    require_devices,
    require_metadata_snap,
    resolve_device,
    split_target,
    total_mapped,
)


# --- ls ---------------------------------------------------------------------------------------------------------
def _ls_params(f: F) -> F:
    """``ls``'s parameters, built from their one declaration (``ls_fast.LS_PARAMS``, which the fast path parses
    with): an optional TARGET argument, options with a value, flags; ``path`` options are click ``Path``s."""
    for p in reversed(LS_PARAMS):
        if p.is_argument:
            f = click.argument(p.dest, required=False, metavar=p.metavar)(f)
        elif p.is_flag:
            f = click.option(*p.flags, p.dest, is_flag=True, help=p.help)(f)
        else:
            f = click.option(*p.flags, p.dest, metavar=p.metavar, envvar=p.envvar, help=p.help,
                             type=click.Path(file_okay=True, dir_okay=True) if p.path else None)(f)
    return f


@click.command("ls")
@_ls_params
def ls(target: str | None, pool_path: str | None, fields: str | None, no_headers: bool, metadata_snap: bool,
       as_json: bool) -> None:
    """List thin devices like thin_ls: mapped, exclusive and shared space, times.

    The default fields come from the device details alone; EXCLUSIVE/SHARED fields walk the mapping trees.
    --json gives sizes as numbers: MAPPED becomes mapped_bytes and mapped_blocks (likewise EXCLUSIVE, SHARED).

    Example: thinpool ls mypool -o DEV,MAPPED,EXCLUSIVE,SHARED
    """
    from thinpool.errors import InvalidArgument
    from thinpool.tools.ls import LS_DEFAULT, check_fields, ls_json, ls_rows, ls_text, needs_mappings

    try:
        chosen = check_fields(fields.split(",")) if fields is not None else list(LS_DEFAULT)
    except InvalidArgument as e:
        raise click.BadParameter(str(e), param_hint="'-o'") from None
    target = target or pool_path
    if not needs_mappings(chosen):  # the details alone: no space map, transaction manager or numpy loaded
        # the fast path's listing (``thinpool_cli.main`` runs it without click when it can)
        write_all(sys.stdout, ls_details_text(metadata_path(target), chosen, no_headers=no_headers,
                                              metadata_snap=metadata_snap, as_json=as_json))
        return
    if metadata_snap:
        require_metadata_snap(target)
    with open_metadata(target, use_metadata_snap=metadata_snap) as pmd:
        walks = any(f.startswith(("EXCLUSIVE", "SHARED")) for f in chosen)
        with node_progress("counting shared blocks", pmd.store, total_mapped(pmd) if walks else 0):
            rows = ls_rows(pmd, chosen)
    if as_json:
        from thinpool_cli.output import echo_json

        echo_json(ls_json(rows, chosen))
        return
    click.echo(ls_text(rows, chosen, headers=not no_headers), nl=False)


# --- delta ------------------------------------------------------------------------------------------------------
@click.command("delta")
@click.argument("args", nargs=-1, metavar="[ID1 ID2] [TARGET]")
@click.option("--snap1", "--thin1", "snap1", help="The left device (id or name).")
@click.option("--snap2", "--thin2", "snap2", help="The right device (id or name).")
@click.option("--verbose", is_flag=True, help="Show data block numbers.")
@click.option("-m", "--metadata-snap", is_flag=True, help="Read through the held metadata snapshot.")
@pool_option
@json_option
def delta(args: tuple[str, ...], snap1: str | None, snap2: str | None, verbose: bool, metadata_snap: bool,
          pool_path: str | None, as_json: bool) -> None:
    """Differences between two thin devices' mappings, like thin_delta (XML).

    Shared subtrees of the two mapping trees are recognised and not compared entry by entry.

    Example: thinpool delta 1 2 mypool   (or: thinpool delta --snap1 1 --snap2 2 mypool/metadata)
    """
    rest, target = split_target(args)
    ids = [s for s in (snap1, snap2) if s is not None] + rest
    if len(ids) != 2 or (snap1 is None) != (snap2 is None):
        raise click.UsageError("give two devices: ID1 ID2, or --snap1 ID1 --snap2 ID2")
    target = target or pool_path
    a, b = resolve_device(ids[0], target), resolve_device(ids[1], target)
    if metadata_snap:
        require_metadata_snap(target)
    with open_metadata(target, use_metadata_snap=metadata_snap) as pmd:
        require_devices(pmd, (a, b))
        with node_progress("comparing mappings", pmd.store, total_mapped(pmd, (a, b))):
            _write_delta(pmd, a, b, verbose, metadata_snap, as_json)


def _write_delta(pmd: Any, a: int, b: int, verbose: bool, metadata_snap: bool, as_json: bool) -> None:
    from thinpool.tools.delta import delta_batches, delta_runs, write_delta_xml

    if as_json:
        from thinpool_cli.output import echo_json

        runs = delta_runs(pmd, a, b)
        echo_json({"left": a, "right": b, "data_block_size": pmd.data_block_size,
                   "ranges": [{"kind": r.kind, "begin": r.begin, "length": r.length,
                               **({"left_data_begin": r.left_data} if r.left_data is not None else {}),
                               **({"right_data_begin": r.right_data}
                                  if r.kind != "same" and r.right_data is not None else {})}
                              for r in runs]})
        return
    nr_data = 0 if metadata_snap else pmd.sb.data_sm_root.nr_blocks
    # through the snapshot, the superblock shown is the snapshot's copy, which holds no snapshot itself
    write_delta_xml(sys.stdout, pmd, a, b, verbose=verbose, nr_data_blocks=nr_data,
                    held_root=0 if metadata_snap else pmd.held_root, batches=delta_batches(pmd, a, b))


# --- rmap -------------------------------------------------------------------------------------------------------
@click.command("rmap")
@click.argument("args", nargs=-1, metavar="[REGION...] [TARGET]")
@click.option("--region", "regions", multiple=True, metavar="BEGIN..END",
              help="Data blocks BEGIN..END (END excluded); repeatable.")
@click.option("--order", type=click.Choice(["cxx", "sorted"]), default="cxx", show_default=True,
              help="cxx: thin_rmap 0.9.0's order (std::sort by data block); sorted: thin_rmap 1.x's (by data "
                   "block, end, device, thin block).")
@click.option("--memory-budget", "budget", default="8M", show_default=True, metavar="SIZE",
              help="Runs kept in memory (32 bytes each); more are sorted on an unlinked temporary file.")
@pool_option
@json_option
def rmap(args: tuple[str, ...], regions: tuple[str, ...], order: str, budget: str, pool_path: str | None,
         as_json: bool) -> None:
    """Which thin blocks map the data blocks of REGION (BEGIN..END), like thin_rmap.

    Memory stays bounded however many runs the regions hold: past a budget they are sorted on an unlinked
    temporary file ($TMPDIR). A progress bar shows on a terminal for a large pool.

    Example: thinpool rmap 0..100 mypool   (or: thinpool rmap --region 0..100 mypool/metadata)
    """
    from thinpool.errors import InvalidArgument
    from thinpool.tools.rmap import rmap_chunks
    from thinpool.units import parse_size

    rest, target = split_target(args)
    parsed = [parse_region(r) for r in list(regions) + rest]
    if not parsed:
        raise click.UsageError("no regions given (e.g. 0..100, or --region 0..100)")
    try:
        budget_bytes = parse_size(budget)
    except InvalidArgument as e:
        raise click.BadParameter(str(e), param_hint="'--memory-budget'") from None
    with open_metadata(target or pool_path) as pmd:
        with mapping_progress("searching mappings", total_mapped(pmd)) as bar, \
                rmap_chunks(pmd, parsed, order=order, budget_bytes=budget_bytes, progress=bar.advance) as chunks:
            first = True
            for rec in chunks:  # formatted a chunk at a time: memory stays one chunk
                db, de, dev, tb = (rec[f].tolist() for f in ("data_begin", "data_end", "dev_id", "thin_begin"))
                if as_json:
                    click.echo(_json_runs(db, de, dev, tb, first), nl=False)
                else:
                    click.echo("".join(f"data {a}..{b} -> thin({d}) {t}..{t + (b - a)}\n"
                                       for a, b, d, t in zip(db, de, dev, tb)), nl=False)
                first = False
            if as_json:
                click.echo("[]" if first else "\n]")


def _json_runs(db: list[int], de: list[int], dev: list[int], tb: list[int], first: bool) -> str:
    """Records of ``json.dumps(runs, indent=2)``, streamed: "[" before the first, "," between them."""
    import json

    parts = []
    for a, b, d, t in zip(db, de, dev, tb):
        rec = json.dumps({"data_begin": a, "data_end": b, "dev_id": d, "thin_begin": t, "thin_end": t + (b - a)},
                         indent=2)
        parts.append(("[\n  " if first else ",\n  ") + rec.replace("\n", "\n  "))
        first = False
    return "".join(parts)
