"""NBD server exporting thinpool block devices (see :mod:`thinpool.nbd.server`)."""

from thinpool.nbd.connection import allocation_extents
from thinpool.nbd.run import ServerThread, serve
from thinpool.nbd.server import NBDServer, ServerOptions

__all__ = ["NBDServer", "ServerOptions", "ServerThread", "allocation_extents", "serve"]
