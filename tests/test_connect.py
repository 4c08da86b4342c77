"""Connecting to Ray, through the real CLI.

- A malformed or unreachable cluster address (`--address` or `RAY_ADDRESS`) fails within seconds,
  with one `error:` line naming it, exit code 2, no traceback and nothing written (no Ray needed).
- The embedded Ray (no address) serves nothing beyond this machine: while a real
  `emergence-ray train` runs, every socket its processes listen on is listed; Ray's are all on
  127.0.0.1, no metrics export answers, and what torch opens on all interfaces answers nothing.
  A `ray start --head` cluster running beside it (as the development set-up recommends) is ignored
  cleanly: the run starts its own Ray and prints no traceback.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import CLI, ROOT, cli_env

LOCAL_CLUSTER = [sys.executable, str(ROOT / "cluster" / "local_cluster.py")]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture(scope="module")
def http_port():
    """A plain HTTP server on loopback: what a dashboard port given as the cluster address is."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


BAD_ADDRESSES = {  # id -> (address, words the error line must hold)
    "nothing-listening": (lambda p: f"127.0.0.1:{_closed_port()}", ["no Ray cluster answers", "firewall"]),
    "http-url": (lambda p: f"http://127.0.0.1:{_closed_port()}", ["HTTP address", "GCS address"]),
    "a-word": (lambda p: "headnode", ["not a Ray address", "HOST:PORT"]),
    "port-out-of-range": (lambda p: "127.0.0.1:99999", ["out of range"]),
    "http-server-port": (lambda p: f"127.0.0.1:{p}", ["not as Ray does", "GCS address"]),
    "unknown-host": (lambda p: "nosuchhost.invalid:6379", ["not found", "check the name"]),  # RFC 6761
    "unknown-scheme": (lambda p: "ftp://127.0.0.1:6379", ["unknown scheme", "HOST:PORT"]),
}


CASES = [(c, "--address") for c in BAD_ADDRESSES] + [(c, "RAY_ADDRESS") for c in ("nothing-listening", "http-url")]


@pytest.mark.parametrize(("case", "via"), CASES, ids=[f"{c}-{v}" for c, v in CASES])
def test_bad_address_fails_fast_with_one_error_line(case, via, http_port, tmp_path):
    make, words = BAD_ADDRESSES[case]
    address = make(http_port)
    storage = tmp_path / "runs"
    args = [*CLI, "train", "--set", f"run.storage_path={storage}"]
    env = cli_env(HOME=str(tmp_path))
    if via == "--address":
        args += ["--address", address]
    else:
        env["RAY_ADDRESS"] = address
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert f"{via}={address}" in errors[0], errors[0]
    for word in words:
        assert word in errors[0], errors[0]
    assert "Traceback" not in out and "GCS" not in out.replace(errors[0], ""), out
    assert took < 30, f"{took:.0f} s to fail"
    assert not storage.exists(), "a failed connection wrote to run.storage_path"


def test_loopback_switch_still_exists_in_this_ray():
    """cluster._loopback_node flips the one private Ray constant this project touches: fail loudly
    here if Ray renames it or stops reading it (then the embedded Ray would listen on every
    interface again). In a fresh process: a test's own Ray would answer with its node's IP."""
    code = ("import ray\nfrom ray._private import ray_constants\nfrom emergence_ray import cluster\n"
            "before = ray.util.get_node_ip_address()\n"
            "with cluster._loopback_node():\n    inside = ray.util.get_node_ip_address()\n"
            "print(before, inside, ray.util.get_node_ip_address(), ray_constants.ENABLE_RAY_CLUSTER)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    before, inside, after, flag = proc.stdout.split()
    assert inside == "127.0.0.1", f"inside _loopback_node Ray chose node IP {inside}"
    assert (after, flag) == (before, "True"), "the switch was not restored"


# ------------------------------------------------------------------- the embedded Ray's sockets


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


def _http_get(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bytes:
    """The first bytes a server sends back to an HTTP GET /metrics without a token (b"" if none)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64)
    except OSError:
        return b""


def _outside_ip() -> str:
    """This machine's address as another machine would use it."""
    import ray

    return ray.util.get_node_ip_address() if not ray.is_initialized() else \
        ray.nodes()[0]["NodeManagerAddress"]


def _watch_sockets(proc: subprocess.Popen, outside_ip: str) -> dict:
    """Every listening socket of `proc` and its descendants until it ends, each probed with an
    unauthenticated HTTP GET when first seen (non-loopback ones on the machine's own address)."""
    import ray  # noqa: F401  - puts Ray's bundled psutil on sys.path
    import psutil

    root, seen, titles = psutil.Process(proc.pid), {}, {}
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                conns, name = p.net_connections(kind="inet"), p.name()
                cmd = " ".join(p.cmdline()[:3])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            titles.setdefault(p.pid, set()).add(name)
            for c in conns:
                bound = c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)
                key = (c.laddr.ip, c.laddr.port, c.type)
                if not bound or key in seen:
                    continue
                host = "127.0.0.1" if _loopback(c.laddr.ip) else outside_ip
                answer = _http_get(c.laddr.port, host) if c.type == socket.SOCK_STREAM else b""
                seen[key] = {"process": name, "cmd": cmd, "answer": answer, "pid": p.pid}
        time.sleep(0.3)
    for v in seen.values():  # every title the owning process had while watched
        v["titles"] = titles[v["pid"]]
    return seen


@pytest.fixture
def dev_cluster():
    """A `ray start --head` cluster (cluster/local_cluster.py: free ports, own temp dir), as a
    developer following README would have running. The temp dir is the one a process with
    RAY_TMPDIR=<dir> treats as Ray's default (/tmp/ray otherwise), so Ray's own discovery finds it."""
    directory = Path(tempfile.mkdtemp(prefix="er-connect-", dir="/tmp"))  # short: Ray's socket paths
    try:
        proc = subprocess.run([*LOCAL_CLUSTER, "start", "--dir", str(directory), "--cpus", "1"],
                              capture_output=True, text=True, timeout=240, env=cli_env())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        state = json.loads((directory / "cluster.json").read_text())
        found = (directory / "ray" / "ray_current_cluster").read_text().strip()  # what Ray's discovery reads
        assert found.rsplit(":", 1)[1] == state["gcs_address"].rsplit(":", 1)[1], found
        yield directory, state
    finally:  # stops exactly this cluster's processes, even if its start failed half-way
        subprocess.run([*LOCAL_CLUSTER, "stop", "--dir", str(directory)], timeout=120, env=cli_env())
        shutil.rmtree(directory, ignore_errors=True)


def test_embedded_ray_serves_nothing_beyond_this_machine_and_ignores_a_running_cluster(dev_cluster, tmp_path):
    from emergence_ray.address import check_address
    from emergence_ray.errors import AddressError

    directory, state = dev_cluster
    # the address check passes a real GCS (gRPC) and refuses the same cluster's dashboard port
    assert check_address(state["gcs_address"]) == state["gcs_address"]
    dashboard = state["dashboard"].removeprefix("http://")
    with pytest.raises(AddressError, match="not as Ray does"):
        check_address(dashboard)
    outside_ip = _outside_ip()
    assert not _loopback(outside_ip), "this machine has no non-loopback address to check"
    storage = tmp_path / "runs"
    proc = subprocess.Popen([*CLI, "train", "--set", "train.epochs=1", "--set", "data.limit=300",
                             "--set", f"run.storage_path={storage}", "--set", "run.name=loopback"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=cli_env(HOME=str(tmp_path), RAY_TMPDIR=str(directory)))
    try:
        seen = _watch_sockets(proc, outside_ip)
        out = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert (storage / "loopback" / "summary.json").exists(), out
    # the running cluster was ignored cleanly: the run started its own Ray, and said nothing of it
    assert "Traceback" not in out and "multiple active Ray instances" not in out, out
    names = {v["process"] for v in seen.values()}
    assert "gcs_server" in names and "raylet" in names, f"the run started no Ray of its own: {names}"
    assert state["gcs_address"] not in out, out
    report = "\n".join(f"{ip}:{port} {v['process']} ({v['cmd']}): {v['answer'][:20]!r}"
                       for (ip, port, _), v in seen.items())
    outside = {k: v for k, v in seen.items() if not _loopback(k[0])}
    # Ray: loopback only. torch's rendezvous store (TCPStore, in the rank-0 training worker) has no
    # bind address and listens on every interface while the process group lives; it answers no
    # request it does not understand. Nothing outside loopback may answer at all.
    # The worker's process title changes with what it runs (ray::RayTrainWorker, cut to the kernel's
    # 15 characters ray::RayTrainWo, ray::RayTrainWorker.run_train_fn, or the method running when the
    # socket was first seen, ray::execute._setup_torch_process_group): the process that owns it must
    # have been titled as the train worker at some point while watched.
    def train_worker(v: dict) -> bool:
        return any(t.startswith("ray::RayTrainWo") or "_setup_torch_process_group" in t for t in v["titles"])

    assert all(train_worker(v) for v in outside.values()), report
    assert len(outside) <= 1, report
    assert not [v for v in outside.values() if v["answer"]], report
    # Metrics export is off: no Ray process answers /metrics without the token, on any address;
    # except the dashboard's and the autoscaler monitor's metrics ports, which have no switch and
    # here listen on 127.0.0.1 only (README: what remains open).
    open_metrics = [v for v in seen.values() if v["answer"].startswith(b"HTTP/1.0 200")
                    or v["answer"].startswith(b"HTTP/1.1 200")]
    assert all("dashboard.py" in v["cmd"] or "monitor.py" in v["cmd"] for v in open_metrics), report
    assert len(seen) >= 6, f"too few sockets seen to mean anything:\n{report}"
