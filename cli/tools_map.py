"""Block maps of thin devices as a command: `thinpool map` (text table, qemu-img map JSON, or a PNG).

Layer: cli. May import: click, thinpool (the library only inside the command), matplotlib (the ``plot`` extra,
only for --png).
"""

from __future__ import annotations

import os
from typing import Any

import click

from thinpool_cli.output import echo_json, table
from thinpool_cli.params import json_option, pool_option
from thinpool_cli.tools_common import (
    node_progress,
    open_metadata,
    require_devices,
    require_metadata_snap,
    resolve_device,
    split_target,
    total_mapped,
)

COLOURS = {"exclusive": "#1f77b4", "shared": "#ff7f0e", "origin": "#9aa0a6", "hole": "#eeeeee"}
MIN_BAR_FRACTION = 0.002  # of the axis: narrower runs are drawn this wide, so a 1-chunk run stays visible


def _map_inputs(target: str | None, pmd: Any) -> dict[int, tuple[str, int, int]]:
    """dev_id -> (name, size bytes, external origin size): from pool.json for a pool, else from the mappings (a
    bare metadata file, or a pool whose manifest cannot be read)."""
    from thinpool.errors import ThinpoolError
    from thinpool.manifest import read_manifest

    ch = pmd.data_block_size * 512
    devices: dict[str, Any] = {}
    if target and os.path.isdir(target):
        try:
            devices = read_manifest(target)["devices"]
        except ThinpoolError:
            devices = {}
    out = {}
    for dev_id in pmd.device_ids():
        e = devices.get(str(dev_id))
        if e is not None:
            origin = e.get("origin")
            osize = os.path.getsize(origin) if origin and os.path.exists(origin) else 0
            out[dev_id] = (str(e["name"] or dev_id), int(e["size"]), osize)
        else:
            hi = pmd.highest_mapped(dev_id)
            out[dev_id] = (str(dev_id), 0 if hi is None else (hi + 1) * ch, 0)
    return out


def _human(n: int) -> str:
    from thinpool.units import format_size

    return format_size(n)


def _need_matplotlib() -> None:
    from importlib.util import find_spec

    if find_spec("matplotlib") is None:
        from thinpool.errors import MissingExtra

        raise MissingExtra(feature="map --png", module="matplotlib", extra="plot")


@click.command("map")
@click.argument("args", nargs=-1, metavar="[ID...] [TARGET]")
@click.option("-m", "--metadata-snap", is_flag=True, help="Read through the held metadata snapshot.")
@click.option("--png", "png", type=click.Path(dir_okay=False),
              help="Draw the devices' chunks side by side here (needs the plot extra: matplotlib).")
@pool_option
@json_option
def map_cmd(args: tuple[str, ...], metadata_snap: bool, png: str | None, pool_path: str | None,
            as_json: bool) -> None:
    """Block map of thin devices: virtual -> data ranges, shared or exclusive, and holes.

    --json prints `qemu-img map --output=json` entries (start, length, depth, present, zero, data, offset in the
    data file) plus "shared"; with several devices, an object keyed by device id. Default: every device.

    Example: thinpool map vol vol-snap --png map.png
    """
    from thinpool.tools.blockmap import device_map
    from thinpool.tools.sharing import Sharing

    if png:
        _need_matplotlib()
    rest, target = split_target(args)
    target = target or pool_path
    wanted = [resolve_device(r, target) for r in rest]
    if metadata_snap:
        require_metadata_snap(target)
    with open_metadata(target, use_metadata_snap=metadata_snap) as pmd:
        ids = wanted or pmd.device_ids()
        require_devices(pmd, ids)
        inputs = _map_inputs(target, pmd)
        # the sharing walk reads every distinct node, then each device's tree is read again for its map
        everything = total_mapped(pmd)
        again = total_mapped(pmd, ids) / max(everything, 1)
        with node_progress("mapping devices", pmd.store, everything, passes=1 + again):
            sharing = Sharing(pmd)
            maps = {d: device_map(pmd, d, inputs[d][1], sharing, inputs[d][2]) for d in ids}
        ch = pmd.data_block_size * 512
    if png:
        draw_png(png, maps, inputs, ch)
    if as_json:
        echo_json(maps[ids[0]] if len(ids) == 1 and rest else {str(d): m for d, m in maps.items()})
        return
    for d in ids:
        _print_map(d, maps[d], inputs[d], ch)
    if png:
        click.echo(f"wrote {png}", err=True)


def _print_map(d: int, entries: list[dict[str, Any]], inp: tuple[str, int, int], ch: int) -> None:
    name, size, _ = inp
    mapped = sum(e["length"] for e in entries if e["data"] and e["depth"] == 0)
    shared = sum(e["length"] for e in entries if e["shared"])
    click.echo(f"device {d} ({name}): {_human(size)}, chunk {_human(ch)}, mapped {_human(mapped)} "
               f"(exclusive {_human(mapped - shared)}, shared {_human(shared)})")
    rows = []
    for e in entries:
        a, n = e["start"], e["length"]
        virt = f"{a // ch}..{(a + n - 1) // ch}"
        if e["data"] and e["depth"] == 0:
            data = f"{e['offset'] // ch}..{(e['offset'] + n - 1) // ch}"
            state = "shared" if e["shared"] else "exclusive"
        elif e["data"]:
            data, state = "-", "origin"
        else:
            data, state = "-", "hole"
        rows.append((a, n, virt, data, state))
    table(None, ["start", "length", "virtual chunks", "data chunks", "state"], rows, right=["start", "length"])


def bar_spans(entries: list[dict[str, Any]], ch: int, width_chunks: float) -> dict[str, list[tuple[float, float]]]:
    """(start, width) in chunks per state; every data or origin run at least MIN_BAR_FRACTION of the axis wide
    (holes keep their true width: they are the background)."""
    bars: dict[str, list[tuple[float, float]]] = {k: [] for k in COLOURS}
    min_w = MIN_BAR_FRACTION * width_chunks
    for e in entries:
        kind = ("shared" if e["shared"] else "exclusive") if e["data"] and e["depth"] == 0 else \
            "origin" if e["data"] else "hole"
        w = e["length"] / ch
        bars[kind].append((e["start"] / ch, w if kind == "hole" else max(w, min_w)))
    return bars


def draw_png(path: str, maps: dict[int, list[dict[str, Any]]], inputs: dict[int, tuple[str, int, int]],
             ch: int) -> None:
    """The devices' chunks side by side (one row each); shared chunks in orange, exclusive in blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ids = list(maps)
    width = max([inputs[d][1] for d in ids] + [ch])
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.45 * len(ids)), dpi=100)
    for row, d in enumerate(ids):
        # holes first, so the (widened) data runs are drawn over them
        for kind, spans in sorted(bar_spans(maps[d], ch, width / ch).items(), key=lambda kv: kv[0] != "hole"):
            if spans:
                ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=COLOURS[kind], linewidth=0)
    ax.set_yticks(range(len(ids)))
    ax.set_yticklabels([f"{d} {inputs[d][0]}" if inputs[d][0] != str(d) else str(d) for d in ids])
    ax.set_xlim(0, width / ch)
    ax.set_ylim(len(ids) - 0.5, -0.5)
    ax.set_xlabel(f"virtual chunk ({ch // 1024} KiB each)")
    ax.set_title("thin device block map", loc="left")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], loc="lower right",
              bbox_to_anchor=(1.0, 1.0), fontsize="small", ncol=4, frameon=False)
    try:
        fig.savefig(path, bbox_inches="tight")
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        plt.close(fig)
