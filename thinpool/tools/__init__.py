"""The metadata tools as library calls (thin_ls, thin_delta, thin_rmap, block maps), testable without the CLI.

Layer: tools. May import: thinpool.errors, thinpool.units, thinpool.metadata, numpy.
"""

from __future__ import annotations
