"""NBD server exporting thinpool block devices (see :mod:`thinpool.nbd.server`)."""

from thinpool.nbd.server import NBDServer, ServerOptions, ServerThread, allocation_extents, serve

__all__ = ["NBDServer", "ServerOptions", "ServerThread", "allocation_extents", "serve"]
