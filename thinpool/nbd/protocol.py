"""NBD wire protocol: magic numbers, option/command/reply codes and struct layouts (fixed newstyle).

Layer: nbd. May import: nothing from thinpool.

All integers on the wire are big-endian. Names follow the NBD protocol document (``proto.md``) without the
``NBD_`` prefix.
"""

from __future__ import annotations

import errno as _errno
import struct

# --- handshake ------------------------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle magic, and the magic in front of every client option
REPLY_MAGIC = 0x0003E889045565A9  # option reply magic

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# info types (NBD_OPT_INFO / NBD_OPT_GO)
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# --- transmission ---------------------------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM",
             CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES", CMD_BLOCK_STATUS: "BLOCK_STATUS",
             CMD_RESIZE: "RESIZE"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunk types and flags
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# errors on the wire (fixed values, independent of the host's errno numbering)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

_HOST_TO_WIRE = {_errno.EPERM: EPERM, _errno.EROFS: EPERM, _errno.EACCES: EPERM, _errno.EIO: EIO,
                 _errno.ENOMEM: ENOMEM, _errno.EINVAL: EINVAL, _errno.ENOSPC: ENOSPC, _errno.EDQUOT: ENOSPC,
                 _errno.EFBIG: ENOSPC, _errno.EOVERFLOW: EOVERFLOW, _errno.ENOTSUP: ENOTSUP,
                 _errno.ESHUTDOWN: ESHUTDOWN}


def wire_errno(host_errno: int | None) -> int:
    """Map a host errno to the NBD error space (anything unknown becomes EINVAL, as the spec asks)."""
    if host_errno is None:
        return EIO
    return _HOST_TO_WIRE.get(host_errno, EINVAL)


# base:allocation
META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# --- struct layouts -------------------------------------------------------------------------------------------
S_SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
S_CLIENT_FLAGS = struct.Struct(">I")
S_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
S_OPTION_REPLY = struct.Struct(">QIII")  # REPLY_MAGIC, option, reply type, length
S_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zero bytes unless NO_ZEROES)
S_INFO_EXPORT = struct.Struct(">HQH")  # INFO_EXPORT, size, transmission flags
S_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, minimum, preferred, maximum
S_REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
S_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
S_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
S_OFFSET = struct.Struct(">Q")
S_HOLE = struct.Struct(">QI")
S_ERROR = struct.Struct(">IH")  # error, message length
S_EXTENT = struct.Struct(">II")  # length, status flags
S_U32 = struct.Struct(">I")
S_U16 = struct.Struct(">H")

# An upper bound on request payloads the server accepts (reads and writes); advertised as the maximum block size.
MAX_PAYLOAD = 32 * 1024 * 1024
MAX_STRING = 4096
