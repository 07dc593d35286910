"""NBD over TLS (NBD_OPT_STARTTLS) with real clients: nbdinfo, nbdcopy (libnbd) and qemu-img (tls-creds-x509),
with and without client certificates; plaintext refused under tls_mode=require. Certificates made with openssl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import need_tool, run_tool
from nbd_client import RawClient
from sparse_device import SparseDevice

from thinpool.nbd import ServerOptions, ServerThread
from thinpool.nbd import protocol as P
from thinpool.nbd.tls import server_context

pytestmark = pytest.mark.external
MiB = 1 << 20


def _openssl(*args: str, cwd: Path) -> None:
    run_tool("openssl", *args, cwd=str(cwd), timeout=60)


def _sign(d: Path, name: str, cn: str, usage: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n"
                                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                   "basicConstraints=critical,CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki():
    """DIR/server (server-cert/key + ca), DIR/client (ca + client-cert/key), DIR/anon (ca only),
    DIR/other (a client certificate from another CA)."""
    need_tool("openssl")
    root = Path(tempfile.mkdtemp(prefix="tptls", dir="/tmp"))
    for sub in ("ca", "ca2"):
        d = root / sub
        d.mkdir()
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
                 "-days", "2", "-subj", f"/CN=thinpool test {sub}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
        _sign(d, "server", "localhost", "serverAuth")
        _sign(d, "client", "thinpool-client", "clientAuth")
    dirs = {}
    for name, src, files in (("server", "ca", ("ca-cert", "server-cert", "server-key")),
                             ("client", "ca", ("ca-cert", "client-cert", "client-key")),
                             ("anon", "ca", ("ca-cert",)),
                             ("other", "ca2", ("client-cert", "client-key"))):
        d = root / name
        d.mkdir()
        for f in files:
            shutil.copy(root / src / f"{f}.pem", d / f"{f}.pem")
        dirs[name] = d
    shutil.copy(root / "ca" / "ca-cert.pem", dirs["other"] / "ca-cert.pem")  # trusts the server, wrong client CA
    yield dirs
    shutil.rmtree(root, ignore_errors=True)


def ctx(pki, client_ca: bool = False):
    s = pki["server"]
    return server_context(str(s / "server-cert.pem"), str(s / "server-key.pem"),
                          str(s / "ca-cert.pem") if client_ca else None)


def tls_server(pki, mode="require", client_ca=False, **kw):
    dev = SparseDevice(32 * MiB)
    dev.write(MiB, b"\x5a" * 65536)
    return ServerThread({"vol": dev}, host="127.0.0.1", port=0,
                        options=ServerOptions(tls=ctx(pki, client_ca), tls_mode=mode), **kw)


def uri(srv, certs: Path | None, name: str = "vol") -> str:
    host, port = srv.addresses[0]
    if certs is None:
        return f"nbd://{host}:{port}/{name}"
    return f"nbds://{host}:{port}/{name}?tls-certificates={certs}"


def qemu_args(srv, certs: Path) -> list[str]:
    host, port = srv.addresses[0]
    spec = {"driver": "nbd", "server": {"type": "inet", "host": host, "port": str(port)}, "export": "vol",
            "tls-creds": "tls0"}
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}", "json:" + json.dumps(spec)]


def test_tls_without_client_certificates(pki):
    need_tool("nbdinfo", "nbdcopy", "qemu-img")
    with tls_server(pki) as srv:
        out = json.loads(run_tool("nbdinfo", "--json", uri(srv, pki["anon"]), timeout=60).stdout)
        assert out["TLS"] is True and out["exports"][0]["export-size"] == 32 * MiB
        # a round trip through nbdcopy, both ways
        work = Path(tempfile.mkdtemp(prefix="tptlsw", dir="/tmp"))
        try:
            src, back = work / "src.img", work / "back.img"
            blob = os.urandom(3 * MiB)
            with open(src, "wb") as f:
                f.truncate(32 * MiB)
                f.seek(5 * MiB)
                f.write(blob)
            run_tool("nbdcopy", str(src), uri(srv, pki["anon"]), timeout=120)
            run_tool("nbdcopy", uri(srv, pki["anon"]), str(back), timeout=120)
            run_tool("cmp", str(src), str(back))
            # qemu-img over TLS: the same bytes
            r = run_tool("qemu-img", "compare", "-f", "raw", str(src), *qemu_args(srv, pki["anon"]), timeout=120,
                         check=False)
            assert r.returncode == 0, r.stdout + r.stderr
        finally:
            shutil.rmtree(work, ignore_errors=True)


def test_plaintext_refused_under_require(pki):
    need_tool("nbdinfo")
    with tls_server(pki) as srv:
        r = run_tool("nbdinfo", uri(srv, None), check=False, timeout=60)
        assert r.returncode != 0
        assert "tls" in (r.stdout + r.stderr).lower()
        # on the wire: every option but STARTTLS/ABORT gets NBD_REP_ERR_TLS_REQD
        import socket as _s

        host, port = srv.addresses[0]
        c = RawClient.__new__(RawClient)
        c.sock = _s.create_connection((host, port), timeout=10)
        c.structured = False
        with c:
            c.greeting()
            c.option(P.OPT_GO, c.info_payload("vol"))
            assert c.reply()[1] == P.REP_ERR_TLS_REQD
            c.option(P.OPT_LIST)
            assert c.reply()[1] == P.REP_ERR_TLS_REQD
            c.option(P.OPT_EXPORT_NAME, b"vol")
            assert c.is_closed_by_server()
        assert srv.server.stats["requests"] == 0


def test_tls_with_client_certificates(pki):
    need_tool("nbdinfo", "qemu-img")
    with tls_server(pki, client_ca=True) as srv:
        out = json.loads(run_tool("nbdinfo", "--json", uri(srv, pki["client"]), timeout=60).stdout)
        assert out["TLS"] is True
        for bad in ("anon", "other"):  # no certificate, or one from another CA
            r = run_tool("nbdinfo", uri(srv, pki[bad]), check=False, timeout=60)
            assert r.returncode != 0, bad
        r = run_tool("qemu-img", "info", "--output=json", *qemu_args(srv, pki["client"]), timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["virtual-size"] == 32 * MiB
        r = run_tool("qemu-img", "info", *qemu_args(srv, pki["anon"]), timeout=60, check=False)
        assert r.returncode != 0
        # the server survived the refused handshakes
        run_tool("nbdinfo", uri(srv, pki["client"]), timeout=60)


def test_tls_optional_serves_both(pki):
    need_tool("nbdinfo", "qemu-io")
    with tls_server(pki, mode="on") as srv:
        assert json.loads(run_tool("nbdinfo", "--json", uri(srv, None), timeout=60).stdout)["TLS"] is False
        assert json.loads(run_tool("nbdinfo", "--json", uri(srv, pki["anon"]), timeout=60).stdout)["TLS"] is True
        host, port = srv.addresses[0]
        run_tool("qemu-io", "-f", "raw", uri(srv, None), "-c", "write -P 0x44 0 64k", "-c", "read -P 0x44 0 64k",
                 timeout=60)


def test_serve_cli_tls_over_unix_socket_and_listen_rules(pki, tmp_path_factory):
    """`thinpool serve` with --tls-cert/--tls-key on a unix socket (nbds+unix) and the listen rules."""
    need_tool("nbdinfo")
    import signal
    import sys

    from thinpool.pool import Pool

    d = Path(tempfile.mkdtemp(prefix="tptlc", dir="/tmp"))
    try:
        pool = d / "pool"
        with Pool.create(str(pool), data_size=16 * MiB) as p:
            p.create_thin(0, 4 * MiB, name="vol")
        s = pki["server"]
        base = [sys.executable, "-c", "from thinpool_cli.main import main; main()", "serve", "--pool", str(pool)]
        tls = ["--tls-cert", str(s / "server-cert.pem"), "--tls-key", str(s / "server-key.pem")]
        # a non-loopback listen address without TLS: refused with one line, nothing started
        r = subprocess.run([*base, "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "TLS" in r.stderr and "Traceback" not in r.stderr, r.stderr
        r = subprocess.run([*base, "--listen", "127.0.0.1:99999"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "99999" in r.stderr and "Traceback" not in r.stderr, r.stderr
        sock = d / "t.sock"
        proc = subprocess.Popen([*base, "--socket", str(sock), "--tls", "require", *tls], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("serving nbds+unix:///vol?socket="), (line, proc.stderr.read())
            u = line.split()[1] + f"&tls-certificates={pki['anon']}"
            r = run_tool("nbdinfo", "--json", u, timeout=60, check=False)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["TLS"] is True
            r = run_tool("nbdinfo", f"nbd+unix:///vol?socket={sock}", timeout=60, check=False)
            assert r.returncode != 0
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        shutil.rmtree(d, ignore_errors=True)
