"""TLS for the NBD server: an ``ssl.SSLContext`` from X.509 files (NBD_OPT_STARTTLS; the protocol's TLS).

Layer: nbd. May import: thinpool.errors.

The server presents ``cert``/``key`` (PEM). With ``ca``, clients must present a certificate signed by it (the
NBD spec's way of authenticating clients; qemu's ``verify-peer``). TLS 1.2 at least, as nbdkit and qemu-nbd.
The file names follow libnbd/qemu/nbdkit's directory convention when a directory is given: ``server-cert.pem``,
``server-key.pem``, ``ca-cert.pem``.
"""

from __future__ import annotations

import os
import ssl

from thinpool.errors import TlsConfigError


def credentials_from_dir(path: str) -> tuple[str, str, str | None]:
    """(cert, key, ca or None) from a qemu/nbdkit-style credentials directory."""
    cert, key, ca = (os.path.join(path, n) for n in ("server-cert.pem", "server-key.pem", "ca-cert.pem"))
    for p in (cert, key):
        if not os.path.isfile(p):
            raise TlsConfigError(reason=f"{p} not found (a credentials directory holds server-cert.pem, "
                                        "server-key.pem and optionally ca-cert.pem)")
    return cert, key, ca if os.path.isfile(ca) else None


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A server-side context; ``ca`` turns on client certificate verification (CERT_REQUIRED)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise TlsConfigError(reason=f"{e.filename or cert}: no such file") from e
    except (ssl.SSLError, OSError) as e:
        raise TlsConfigError(reason=f"cannot load certificate {cert} / key {key}: {e}") from e
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except FileNotFoundError as e:
            raise TlsConfigError(reason=f"{ca}: no such file") from e
        except (ssl.SSLError, OSError) as e:
            raise TlsConfigError(reason=f"cannot load CA certificate {ca}: {e}") from e
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
