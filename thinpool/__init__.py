"""thinpool: a thin-provisioned block device emulator with Linux dm-thin on-disk metadata."""

from __future__ import annotations

__version__ = "0.1.0"
