"""Thin devices and snapshot deltas to and from Ceph RBD: ``rbd diff v1`` streams and ``--export-format 2`` images.

Layer: rbd. May import: errors, units, metadata, tools, thin, pool.

- ``stream``: the formats (records, a strict validator that names the byte where a stream broke, a writer);
- ``changes``: which chunks a diff carries (all mapped ones, or what differs from an older snapshot);
- ``export``: ``export_diff`` (v1) and ``export_image`` (export-format 2, a device with its snapshots);
- ``importer``: ``import_diff`` and ``import_image``, validating the whole stream before changing anything.
"""

from __future__ import annotations

from thinpool.rbd.export import ExportSummary, export_diff, export_image, snapshot_chain
from thinpool.rbd.importer import ImportSummary, import_diff, import_image
from thinpool.rbd.stream import DiffWriter, StreamReader, scan_image, validate_diff

__all__ = ["DiffWriter", "ExportSummary", "ImportSummary", "StreamReader", "export_diff", "export_image",
           "import_diff", "import_image", "scan_image", "snapshot_chain", "validate_diff"]
