"""`thinpool metadata-size`: estimate a pool's metadata size, with thin_metadata_size's options, units and output.

Layer: cli. May import: click, thinpool.errors.

The estimate is thin_metadata_size 0.9.0's (checked against the real tool in tests/cli): one 4 KiB metadata block
per 126 mappings (B-tree leaves half full) plus one per thin device plus one, ``nr_blocks // 126 + max_thins + 1``.
Input sizes take thin_metadata_size's suffixes (b s k m g t p e z y: powers of 1024; K M G T P E Z Y: powers of
1000; no suffix: sectors).
"""

from __future__ import annotations

import re

import click

from thinpool.errors import InvalidArgument

UNITS: dict[str, tuple[int, str]] = {
    "b": (1, "bytes"), "s": (512, "sectors"),
    "k": (1 << 10, "kibibytes"), "m": (1 << 20, "mebibytes"), "g": (1 << 30, "gibibytes"),
    "t": (1 << 40, "tebibytes"), "p": (1 << 50, "pebibytes"), "e": (1 << 60, "exbibytes"),
    "z": (1 << 70, "zebibytes"), "y": (1 << 80, "yobibytes"),
    "K": (10 ** 3, "kilobytes"), "M": (10 ** 6, "megabytes"), "G": (10 ** 9, "gigabytes"),
    "T": (10 ** 12, "terabytes"), "P": (10 ** 15, "petabytes"), "E": (10 ** 18, "exabytes"),
    "Z": (10 ** 21, "zettabytes"), "Y": (10 ** 24, "yottabytes"),
}
MAPPINGS_PER_BLOCK = 126  # a mapping leaf holds 252 entries; the estimate assumes half-full leaves
METADATA_BLOCK_BYTES = 4096
_SIZE_RE = re.compile(r"^(\d+)([bskmgtpezyKMGTPEZY]?)$")


def _parse(text: str, what: str) -> tuple[int, str]:
    """(bytes, the text as thin_metadata_size echoes it: number and unit name)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise InvalidArgument(reason=f"{what} {text!r}: use a number with an optional unit (bskmgtpezy, KMGTPEZY)")
    factor, name = UNITS[m.group(2) or "s"]
    return int(m.group(1)) * factor, f"{m.group(1)}{name}"


def estimate_metadata_bytes(pool_bytes: int, block_bytes: int, max_thins: int) -> int:
    """thin_metadata_size's estimate in bytes (a whole number of 4 KiB blocks)."""
    nr_blocks = pool_bytes // block_bytes
    return (nr_blocks // MAPPINGS_PER_BLOCK + max_thins + 1) * METADATA_BLOCK_BYTES


def format_value(value: float) -> str:
    """thin_metadata_size's number format: whole numbers as integers, else two decimals, tiny ones as %.2e."""
    if value == int(value):
        return str(int(value))
    return f"{value:.2f}" if value >= 0.01 else f"{value:.2e}"


@click.command("metadata-size")
@click.option("-b", "--block-size", "block_size", required=True, metavar="SIZE[bskKmMgG...]",
              help="Data block (chunk) size; no unit means sectors.")
@click.option("-s", "--pool-size", "pool_size", required=True, metavar="SIZE[bskKmMgGtT...]",
              help="Size of the pool's data device; no unit means sectors.")
@click.option("-m", "--max-thins", "max_thins", metavar="N", help="Maximum number of thin devices and snapshots.")
@click.option("-u", "--unit", "unit", default="s", show_default=True, metavar="{bskKmMgGtTpPeEzZyY}",
              help="Output unit.")
@click.option("-n", "--numeric-only", "numeric", is_flag=False, flag_value="plain", default=None,
              type=click.Choice(["plain", "short", "long"]), help="Print the number only.")
def metadata_size(block_size: str, pool_size: str, max_thins: str | None, unit: str, numeric: str | None) -> None:
    """Estimate the metadata size for a pool, as thin_metadata_size does (same options, units and output).

    Example: thinpool metadata-size -b 64k -s 1t -m 1000 -u m
    """
    block, block_text = _parse(block_size, "block size")
    pool, pool_text = _parse(pool_size, "pool size")
    if not max_thins:
        raise InvalidArgument(reason="max thins required!")
    t = max_thins.strip()
    thins, thins_text = (int(t), t) if t.isdigit() else _parse(t, "max thins")  # a bare count is not sectors
    if thins == 0:
        raise InvalidArgument(reason="max thins required!")
    if block <= 0 or block & (block - 1):
        raise InvalidArgument(reason="block size must be 2^^N")
    if pool <= block:
        raise InvalidArgument(reason="pool size must be larger than block size")
    if unit not in UNITS:
        raise InvalidArgument(reason="output unit specifier invalid!")
    factor, name = UNITS[unit]
    value = format_value(estimate_metadata_bytes(pool, block, thins) / factor)
    if numeric is not None:
        click.echo(value)
        return
    click.echo(f"thinpool metadata-size - {value} {name} estimated metadata area size for "
               f"\"--block-size={block_text} --pool-size={pool_text} --max-thins={thins_text}\"")
