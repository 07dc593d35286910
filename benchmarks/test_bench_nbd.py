"""fio (nbd engine) against thinpool's NBD server and nbdkit's C `memory` plugin, in the same run.

Workloads: 4 KiB randwrite at QD1 and QD16, 1 MiB sequential write. The servers listen on unix sockets in
their own processes: thinpool's NBD server on a 256 MiB MemoryDevice (the protocol layer alone), nbdkit's
`memory` plugin (same size), and `thinpool serve` on a fresh pool's 256 MiB thin device (the real data path:
the first pass provisions chunks). Reported: IOPS / MB/s per server and the ratio
thinpool / nbdkit (printed, and stored in pytest-benchmark's extra_info). Goal from issue 8: >= 0.8x at QD16.

Run: python -m pytest benchmarks/test_bench_nbd.py -s   (not collected by plain `pytest`: testpaths = tests)
Environment: THINPOOL_BENCH_RUNTIME (seconds per fio job, default 2), THINPOOL_BENCH_ROUNDS (default 3). The
runs of the two servers are interleaved (A B, B A, ...) and medians reported, because a small VM is noisy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

SIZE = 256 * 1024 * 1024
RUNTIME = float(os.environ.get("THINPOOL_BENCH_RUNTIME", "2"))
ROUNDS = int(os.environ.get("THINPOOL_BENCH_ROUNDS", "3"))  # interleaved A/B rounds; medians are reported

WORKLOADS = {
    "4k-randwrite-qd1": ["--rw=randwrite", "--bs=4k", "--iodepth=1"],
    "4k-randwrite-qd16": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "1m-seqwrite-qd1": ["--rw=write", "--bs=1M", "--iodepth=1"],
    "1m-seqwrite-qd8": ["--rw=write", "--bs=1M", "--iodepth=8"],
}


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = f"benchmark tool(s) not installed: {', '.join(missing)}"
        if os.environ.get("THINPOOL_REQUIRE_EXTERNAL") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def _wait_socket(path: str, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start (rc={proc.poll()})")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def servers():
    _need("fio", "nbdkit")
    if "nbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout:
        pytest.skip("fio has no nbd engine")
    tmp = tempfile.mkdtemp(prefix="tpbench", dir="/tmp")
    procs = []
    try:
        ours = os.path.join(tmp, "thinpool.sock")
        code = textwrap.dedent(f"""
            from thinpool.io.device import MemoryDevice
            from thinpool.nbd import serve
            serve({{"": MemoryDevice({SIZE})}}, unix_path={ours!r})
        """)
        procs.append(subprocess.Popen([sys.executable, "-c", code]))
        _wait_socket(ours, procs[-1])
        ref = os.path.join(tmp, "nbdkit.sock")
        procs.append(subprocess.Popen(["nbdkit", "-f", "-U", ref, "memory", f"size={SIZE}"]))
        _wait_socket(ref, procs[-1])
        uris = {"thinpool": f"nbd+unix:///?socket={ours}", "nbdkit-memory": f"nbd+unix:///?socket={ref}"}
        pids = {"thinpool": procs[0].pid, "nbdkit-memory": procs[1].pid}
        thin = _start_thin_server(tmp, procs)
        if thin:
            uris["thinpool-thin"] = thin
            pids["thinpool-thin"] = procs[-1].pid
        SERVER_PIDS.clear()
        SERVER_PIDS.update(pids)
        yield uris
    finally:
        for p in procs:
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def _start_thin_server(tmp: str, procs: list) -> str | None:
    """`thinpool serve` on a fresh pool with one 256 MiB thin device (64 KiB chunks): the real data path."""
    try:
        from thinpool.pool import Pool
    except ImportError:
        return None
    pool_path = os.path.join(tmp, "pool")
    with Pool.create(pool_path, data_size=2 * SIZE, chunk_size=64 * 1024) as pool:
        pool.create_thin(0, SIZE)
    sock = os.path.join(tmp, "thin.sock")
    procs.append(subprocess.Popen([sys.executable, "-m", "thinpool_cli.serve_cmds", "serve", "--pool", pool_path,
                                   "--socket", sock], stdout=subprocess.DEVNULL))
    _wait_socket(sock, procs[-1])
    return f"nbd+unix:///0?socket={sock}"


SERVER_PIDS: dict[str, int] = {}


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fio(uri: str, args: list[str], home: str | None = None) -> dict:
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={SIZE}", "--time_based",
           f"--runtime={RUNTIME}", "--ramp_time=0.5", "--output-format=json", *args]
    env = {**os.environ, "HOME": home} if home else None
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=RUNTIME * 4 + 60, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    text = r.stdout
    res, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    w = res["jobs"][0]["write"]
    return {"iops": w["iops"], "mb_s": w["bw_bytes"] / 1e6, "lat_us_mean": w["lat_ns"]["mean"] / 1000}


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_fio_nbd(benchmark, servers, workload):
    runs: dict[str, list[dict]] = {name: [] for name in servers}

    def run_all():
        names = list(servers)
        for r in range(ROUNDS):
            for name in (names if r % 2 == 0 else names[::-1]):
                runs[name].append(run_fio(servers[name], WORKLOADS[workload]))

    benchmark.pedantic(run_all, rounds=1, iterations=1)

    def median(name: str) -> dict:
        rs = sorted(runs[name], key=lambda x: x["iops"])
        return {**rs[len(rs) // 2], "all_iops": [round(x["iops"]) for x in runs[name]]}

    ref = median("nbdkit-memory")
    benchmark.extra_info.update({"workload": workload, "nbdkit_memory": ref})
    print(f"\n{workload}: nbdkit memory {ref['iops']:.0f} IOPS ({ref['mb_s']:.0f} MB/s) {ref['all_iops']}")
    for name in servers:
        if name == "nbdkit-memory":
            continue
        ours = median(name)
        ratio = ours["iops"] / ref["iops"] if ref["iops"] else float("nan")
        key = name.replace("-", "_")
        benchmark.extra_info.update({key: ours, f"ratio_{key}_vs_nbdkit_memory": round(ratio, 3)})
        print(f"  {name:14s} {ours['iops']:.0f} IOPS ({ours['mb_s']:.0f} MB/s) {ours['all_iops']}: "
              f"ratio {ratio:.2f}x")
        assert ours["iops"] > 0
    assert ref["iops"] > 0


@pytest.mark.parametrize("iodepth", [1, 16])
def test_server_cpu_per_request(benchmark, servers, iodepth):
    """Server-process CPU time (user+sys from /proc) per 4 KiB random write, for a fixed number of requests.

    Less sensitive to a busy machine than IOPS: it counts the work each server does per request."""
    n = int(os.environ.get("THINPOOL_BENCH_CPU_IOS", "50000"))
    result: dict[str, dict] = {}

    def run_all():
        for name, uri in servers.items():
            pid = SERVER_PIDS[name]
            c0, t0 = _cpu_seconds(pid), time.monotonic()
            cmd = ["fio", "--name=cpu", "--ioengine=nbd", f"--uri={uri}", f"--size={SIZE}", "--rw=randwrite",
                   "--bs=4k", f"--iodepth={iodepth}", f"--number_ios={n}", "--io_size=100G", "--output-format=json"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            c1, t1 = _cpu_seconds(pid), time.monotonic()
            result[name] = {"cpu_us_per_req": round((c1 - c0) / n * 1e6, 2), "iops_wall": round(n / (t1 - t0))}

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    ref = result["nbdkit-memory"]
    benchmark.extra_info.update({"iodepth": iodepth, **{k.replace("-", "_"): v for k, v in result.items()}})
    print(f"\nQD{iodepth} server CPU per 4k write: " + ", ".join(
        f"{k} {v['cpu_us_per_req']} us ({v['iops_wall']} IOPS, {v['iops_wall'] / ref['iops_wall']:.2f}x)"
        for k, v in result.items()))


# --- TLS: fio 4 KiB randwrite QD16 through TLS and plaintext, next to nbdkit memory and qemu-nbd -------------
def _make_pki(d: str) -> str:
    """A throwaway CA and server certificate (openssl) in qemu/nbdkit/libnbd's directory layout."""
    def ossl(*a: str) -> None:
        subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days",
         "2", "-subj", "/CN=bench ca", "-addext", "basicConstraints=critical,CA:TRUE", "-addext",
         "keyUsage=critical,keyCertSign,cRLSign")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem", "-out", "server.csr", "-subj",
         "/CN=localhost")
    with open(os.path.join(d, "ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
         "-out", "server-cert.pem", "-days", "2", "-extfile", "ext")
    # fio's nbd engine refuses tls-certificates= in a URI (libnbd's uri_allow_local_file): libnbd then looks in
    # its default directory, $HOME/.pki/libnbd, so fio runs with HOME pointing here
    client = os.path.join(d, "home", ".pki", "libnbd")
    os.makedirs(client)
    shutil.copy(os.path.join(d, "ca-cert.pem"), client)
    return os.path.join(d, "home")


@pytest.fixture(scope="module")
def tls_servers():
    _need("fio", "nbdkit", "qemu-nbd", "openssl")
    if "nbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout:
        pytest.skip("fio has no nbd engine")
    tmp = tempfile.mkdtemp(prefix="tpbtls", dir="/tmp")
    procs: list[subprocess.Popen] = []
    try:
        client = _make_pki(tmp)
        cert, key = os.path.join(tmp, "server-cert.pem"), os.path.join(tmp, "server-key.pem")
        uris = {}
        for name, tls in (("thinpool", False), ("thinpool-tls", True)):
            sock = os.path.join(tmp, f"{name}.sock")
            code = textwrap.dedent(f"""
                from thinpool.io.device import MemoryDevice
                from thinpool.nbd import ServerOptions, serve
                from thinpool.nbd.tls import server_context
                opts = ServerOptions(tls=server_context({cert!r}, {key!r}), tls_mode="require") if {tls} \\
                    else ServerOptions()
                serve({{"": MemoryDevice({SIZE})}}, unix_path={sock!r}, options=opts)
            """)
            procs.append(subprocess.Popen([sys.executable, "-c", code]))
            _wait_socket(sock, procs[-1])
            uris[name] = f"nbds+unix:///?socket={sock}" if tls else f"nbd+unix:///?socket={sock}"
        for name, tls in (("nbdkit-memory", False), ("nbdkit-memory-tls", True)):
            sock = os.path.join(tmp, f"{name}.sock")
            extra = ["--tls=require", f"--tls-certificates={tmp}"] if tls else []
            procs.append(subprocess.Popen(["nbdkit", "-f", "-U", sock, *extra, "memory", f"size={SIZE}"]))
            _wait_socket(sock, procs[-1])
            uris[name] = f"nbds+unix:///?socket={sock}" if tls else f"nbd+unix:///?socket={sock}"
        for name, tls in (("qemu-nbd-raw", False), ("qemu-nbd-raw-tls", True)):
            img = os.path.join(tmp, f"{name}.img")
            with open(img, "wb") as f:
                f.truncate(SIZE)
            sock = os.path.join(tmp, f"{name}.sock")
            extra = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tmp},verify-peer=off",
                     "--tls-creds", "tls0"] \
                if tls else []
            procs.append(subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", sock, "-t", "--shared=8", "-x", "",
                                           *extra, img]))
            _wait_socket(sock, procs[-1])
            uris[name] = f"nbds+unix:///?socket={sock}" if tls else f"nbd+unix:///?socket={sock}"
        uris["_home"] = client
        yield uris
    finally:
        for p in procs:
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def test_fio_nbd_tls_4k_randwrite_qd16(benchmark, tls_servers):
    """fio 4 KiB randwrite QD16 through TLS and plaintext: thinpool (MemoryDevice: the protocol layer), nbdkit's
    memory plugin and qemu-nbd on a raw sparse file, each with and without TLS, interleaved rounds, medians."""
    args = WORKLOADS["4k-randwrite-qd16"]
    home = tls_servers["_home"]
    servers = {k: v for k, v in tls_servers.items() if not k.startswith("_")}
    runs: dict[str, list[dict]] = {name: [] for name in servers}

    def run_all():
        names = list(servers)
        for r in range(ROUNDS):
            for name in (names if r % 2 == 0 else names[::-1]):
                runs[name].append(run_fio(servers[name], args, home=home))

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    med = {}
    for name, rs in runs.items():
        rs = sorted(rs, key=lambda x: x["iops"])
        med[name] = {**rs[len(rs) // 2], "all_iops": [round(x["iops"]) for x in runs[name]]}
    ref = med["nbdkit-memory"]["iops"]
    print("\n4k-randwrite-qd16, TLS vs plaintext (median IOPS; ratio vs nbdkit memory plaintext):")
    for name, m in med.items():
        print(f"  {name:20s} {m['iops']:8.0f} IOPS  {m['lat_us_mean']:7.1f} us  {m['iops'] / ref:5.2f}x  "
              f"{m['all_iops']}")
        benchmark.extra_info[name.replace("-", "_")] = m
        assert m["iops"] > 0
    tls_cost = med["thinpool-tls"]["iops"] / med["thinpool"]["iops"]
    benchmark.extra_info["thinpool_tls_over_plain"] = round(tls_cost, 3)
    print(f"  thinpool TLS / plaintext: {tls_cost:.2f}x; qemu-nbd TLS / plaintext: "
          f"{med['qemu-nbd-raw-tls']['iops'] / med['qemu-nbd-raw']['iops']:.2f}x")


# --- issue 15's acceptance cells (thinpool_bench/nbd_peers.py; `thinpool bench --only nbd` writes RESULTS-nbd.md) --
def test_fio_nbd_acceptance_cells(benchmark):
    """4 KiB random overwrite and 1 MiB sequential read vs nbdkit memory, snapshot-break vs qemu-nbd + qcow2, QD16,
    in one run (quick sizes unless THINPOOL_BENCH_FULL=1). Ratios are printed and kept in extra_info."""
    from thinpool_bench import nbd_peers

    miss = nbd_peers.missing_tools()
    if miss:
        _need(*miss)
    out: dict = {}
    benchmark.pedantic(lambda: out.update(nbd_peers.run(quick=os.environ.get("THINPOOL_BENCH_FULL") != "1")),
                       rounds=1, iterations=1)
    for c in out["claims"]:
        print(f"\n{c['verdict']:>7} {c['ratio']:.2f}x  {c['claim']}")
        benchmark.extra_info[c["cell"]] = round(c["ratio"], 3)
        assert c["ratio"] > 0
