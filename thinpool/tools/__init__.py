"""The metadata tools as library calls (thin_ls, thin_delta, thin_rmap, block maps), testable without the CLI.

Layer: tools. May import: thinpool.errors, thinpool.units, thinpool.btree (the walker), thinpool.metadata, numpy.

- ``delta``: ``delta_runs`` / ``delta_batches`` (two mapping trees walked together, shared subtrees skipped),
  ``mapped_runs``, and thin_delta's XML writer.
- ``ls``: thin_ls rows with fields computed only when asked for; ``sharing``: which data blocks are mapped more
  than once (two bit maps over the data device).
- ``rmap``: thin_rmap's runs, sorted by ``stdsort`` (libstdc++'s std::sort, for thin_rmap's order of ties).
- ``blockmap``: qemu-img-map-style entries of a device, shared or exclusive.

Every tool streams the mappings leaf by leaf (``metadata.ir``): memory does not grow with the mapping count.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thinpool.tools.blockmap import device_map
    from thinpool.tools.delta import DeltaRun, delta_batches, delta_runs, mapped_runs, write_delta_xml
    from thinpool.tools.ls import LS_DEFAULT, LS_FIELDS, ls_json, ls_rows, ls_text
    from thinpool.tools.rmap import RmapRun, rmap_runs
    from thinpool.tools.sharing import Sharing

# Imported on first use (PEP 562): ``thinpool ls`` need not import the delta, rmap and block-map modules.
_WHERE = {"device_map": "blockmap", "DeltaRun": "delta", "delta_batches": "delta", "delta_runs": "delta",
          "mapped_runs": "delta", "write_delta_xml": "delta", "LS_DEFAULT": "ls", "LS_FIELDS": "ls",
          "ls_json": "ls", "ls_rows": "ls", "ls_text": "ls", "RmapRun": "rmap", "rmap_runs": "rmap",
          "Sharing": "sharing"}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'thinpool.tools' has no attribute {name!r}")
    value = getattr(import_module(f"thinpool.tools.{mod}"), name)
    globals()[name] = value
    return value


__all__ = ["LS_DEFAULT", "LS_FIELDS", "DeltaRun", "RmapRun", "Sharing", "delta_batches", "delta_runs",
           "device_map", "ls_json", "ls_rows", "ls_text", "mapped_runs", "rmap_runs", "write_delta_xml"]
