"""thin_check as a command: `thinpool check`.

Layer: cli. May import: click, thinpool (the library only inside the command).

The output (steps on stderr, TRANSACTION_ID= / METADATA_FREE_BLOCKS= on stdout) and the exit status follow
thin_check 0.9.0.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from thinpool_cli.output import echo_json
from thinpool_cli.params import is_pool_dir, json_option, metadata_path
from thinpool_cli.tools_common import node_progress, require_metadata_snap, target_option, tool_store

# --- check ------------------------------------------------------------------------------------------------------
_STEPS = ("examining superblock", "examining devices tree", "examining mapping tree", "checking space map counts")


def _step(section: str) -> int:
    if section.startswith("superblock"):
        return 0
    if section.startswith("devices tree"):
        return 1
    if section.startswith("space map"):
        return 3
    return 2  # mapping tree, metadata snapshot, mapping times


@click.command("check")
@target_option
@click.option("-q", "--quiet", is_flag=True, help="No output; just the exit status.")
@click.option("--super-block-only", is_flag=True, help="Only check the superblock.")
@click.option("--skip-mappings", is_flag=True, help="Do not walk the bottom-level mapping trees.")
@click.option("--ignore-non-fatal-errors", is_flag=True, help="Leaked blocks do not fail the check.")
@click.option("--clear-needs-check-flag", is_flag=True, help="Clear NEEDS_CHECK when the check passes.")
@click.option("-m", "--metadata-snap", is_flag=True, help="Check through the held metadata snapshot.")
@click.option("--auto-repair", is_flag=True,
              help="Repair leaked blocks (space map counts above the references found), then check again; refused "
                   "when the metadata has any other error.")
@json_option
def check(target: str | None, pool_path: str | None, quiet: bool, super_block_only: bool, skip_mappings: bool,
          ignore_non_fatal_errors: bool, clear_needs_check_flag: bool, metadata_snap: bool, auto_repair: bool,
          as_json: bool) -> None:
    """Check metadata like thin_check: exit 0 when consistent, 1 when not.

    Prints thin_check's steps on stderr and TRANSACTION_ID= / METADATA_FREE_BLOCKS= on stdout (as thin_check
    0.9.0, METADATA_FREE_BLOCKS is the metadata device's blocks minus the superblock; --json gives the real count).

    --auto-repair (as thin_check 1.x) lowers the count of every leaked block, data and metadata, to the
    references found, in one transaction, then checks again; with any error other than leaks it refuses (exit 1)
    and changes nothing.

    Example: thinpool check mypool   (or: thinpool check mypool/metadata; thinpool check --auto-repair mypool)
    """
    from thinpool.errors import ThinpoolError
    from thinpool.metadata.check import check_metadata
    from thinpool.metadata.pool_metadata import PoolMetadata

    path = metadata_path(target or pool_path)
    if auto_repair:
        for flag, given in (("-m", metadata_snap), ("--super-block-only", super_block_only),
                            ("--skip-mappings", skip_mappings)):
            if given:
                raise click.UsageError(f"--auto-repair checks everything: it cannot be combined with {flag}")
        _auto_repair(target or pool_path or path, path, quiet, ignore_non_fatal_errors, clear_needs_check_flag,
                     as_json)
        return
    if metadata_snap:
        require_metadata_snap(path)
    store = tool_store(path)
    try:
        # about 250 mappings per allocated metadata block: the work estimate for the progress bar's threshold
        try:
            work = PoolMetadata.read_superblock(store).metadata_sm_root.nr_allocated * 250
        except ThinpoolError:
            work = 0  # a damaged superblock: check_metadata reports it
        with node_progress("checking metadata", store, work, trees_only=False):
            report = check_metadata(store, use_metadata_snap=metadata_snap, skip_mappings=skip_mappings)
        nr_blocks = store.nr_blocks
    finally:
        store.close()
    sb_problems = [p for p in report.problems if _step(p.section) == 0]
    problems = sb_problems if super_block_only else report.problems
    failed = any(p.fatal for p in problems) or (not ignore_non_fatal_errors and any(
        not p.fatal and not p.warning for p in problems))
    cleared = False
    if clear_needs_check_flag and not failed and report.needs_check:
        _clear_needs_check(target or pool_path or path, path)
        cleared = True
    if as_json:
        echo_json(_check_json(report, problems, failed, cleared))
    elif not quiet:
        _print_check(report, problems, 0 if super_block_only else 3, nr_blocks, cleared)
    if failed:
        raise click.exceptions.Exit(1)


def _auto_repair(target: str, path: str, quiet: bool, ignore_non_fatal_errors: bool, clear_needs_check_flag: bool,
                 as_json: bool) -> None:
    """check --auto-repair under the pool's lock: the check's output, a line saying what was repaired, and the
    re-check's output; a refusal prints the check's output and raises (nothing written)."""
    from thinpool.errors import LeakRepairRefused, ThinpoolError
    from thinpool.metadata.check import repair_leaks
    from thinpool.metadata.pool_metadata import PoolMetadata
    from thinpool.pool import lock_pool_dir

    lock_fd = lock_pool_dir(target) if is_pool_dir(target) else None
    try:
        store = tool_store(path, readonly=False)
        try:
            try:  # the same work estimate as a plain check (about 250 mappings per allocated metadata block)
                work = PoolMetadata.read_superblock(store).metadata_sm_root.nr_allocated * 250
            except ThinpoolError:
                work = 0
            # check, then (after the repair) check again: the metadata is read twice
            with node_progress("checking metadata", store, work, passes=2, trees_only=False):
                try:
                    res = repair_leaks(store, name=path)
                except LeakRepairRefused as e:
                    if not quiet and not as_json:  # the check's findings, then the one-line refusal
                        _print_check(e.report, e.report.problems, 3, store.nr_blocks, False)
                    raise
            nr_blocks = store.nr_blocks
        finally:
            store.close()
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    after = res.after
    failed = bool(after.errors) or (not ignore_non_fatal_errors and bool(after.leaks))
    cleared = False
    if clear_needs_check_flag and not failed and after.needs_check:
        _clear_needs_check(target, path)
        cleared = True
    repaired = {"data_blocks": res.data_blocks, "metadata_blocks": res.metadata_blocks,
                "data_blocks_freed": res.data_freed, "metadata_blocks_freed": res.metadata_freed}
    if as_json:
        out = _check_json(after, after.problems, failed, cleared)
        out["repaired"] = repaired
        out["leaks_before"] = [_problem(p) for p in res.before.leaks]
        echo_json(out)
    elif not quiet:
        if res.before.leaks:
            _print_check(res.before, res.before.problems, 3, nr_blocks, False, kv=False)
            sys.stderr.write(f"repairing leaks: lowered the counts of {res.data_blocks} data block(s) "
                             f"({res.data_freed} now free) and {res.metadata_blocks} metadata block(s) "
                             f"({res.metadata_freed} now free)\n")
        _print_check(after, after.problems, 3, nr_blocks, cleared)
    if failed:
        raise click.exceptions.Exit(1)


def _check_json(report: Any, problems: list[Any], failed: bool, cleared: bool) -> dict[str, Any]:
    return {"ok": not failed, "transaction_id": report.transaction_id, "needs_check": report.needs_check,
            "needs_check_cleared": cleared, "metadata_blocks": report.metadata_blocks,
            "metadata_free_blocks": report.metadata_free_blocks, "data_blocks": report.data_blocks,
            "data_used_blocks": report.data_used_blocks, "devices": report.devices, "mappings": report.mappings,
            "errors": [_problem(p) for p in problems if p.fatal],
            "leaks": [_problem(p) for p in problems if not p.fatal and not p.warning],
            "warnings": [_problem(p) for p in problems if p.warning]}


def _print_check(report: Any, problems: list[Any], last_step: int, nr_blocks: int, cleared: bool, *,
                 kv: bool = True) -> None:
    """thin_check 0.9.0's layout: steps on stderr with their problems indented, the two KEY=VALUE lines on stdout
    once the superblock is good, and no further steps after one that found errors."""
    err = sys.stderr
    for i, title in enumerate(_STEPS[:last_step + 1]):
        err.write(title + "\n")
        here = [p for p in problems if _step(p.section) == i]
        for p in here:
            tag = "(warning) " if p.warning else "(leak) " if not p.fatal else ""
            err.write(f"  {tag}{p}\n")
        if i == 0 and not here and kv:
            click.echo(f"TRANSACTION_ID={report.transaction_id}")
            click.echo(f"METADATA_FREE_BLOCKS={max(nr_blocks - 1, 0)}")
        if any(p.fatal for p in here):
            break
    if cleared:
        err.write("cleared needs_check flag\n")
    err.flush()


def _problem(p: Any) -> dict[str, Any]:
    return {"section": p.section, "message": p.message, "block": p.block}


def _clear_needs_check(target: str, md_path: str) -> None:
    """Clear NEEDS_CHECK and commit (taking the pool's lock when the target is a pool directory)."""
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata
    from thinpool.pool import lock_pool_dir

    lock_fd = lock_pool_dir(target) if is_pool_dir(target) else None
    try:
        md = PoolMetadata.open(FileBlockStore(md_path), allow_needs_check=True)
        try:
            md.clear_needs_check()
            md.commit()
        finally:
            md.close()
    finally:
        if lock_fd is not None:
            os.close(lock_fd)




