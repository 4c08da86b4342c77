"""A local Ray cluster for development: one head plus N worker nodes on this machine, on free
ports, in a temp folder of its own; `stop` ends exactly the processes it started (never a plain
`ray stop`, which would also kill every other Ray on the machine).

    python cluster/local_cluster.py start --dir /tmp/dev-ray --workers 1 --cpus 2
    export RAY_ADDRESS=$(python cluster/local_cluster.py address --dir /tmp/dev-ray)   # http://127.0.0.1:PORT
    export RAY_AUTH_MODE=token        # clients send the token from ~/.ray/auth_token
    ray job submit --working-dir . -- python -m emergence_ray train --config jobs/digits.yaml
    python cluster/local_cluster.py stop --dir /tmp/dev-ray

Token authentication stays on (Ray's default); the dashboard and Jobs API listen on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = "cluster.json"
MARKER = "EMERGENCE_RAY_LOCAL_CLUSTER"  # environment variable naming the cluster's folder


def free_ports(n: int) -> list[int]:
    """n distinct free ports. Each socket stays bound until all are chosen: ports taken one at a time
    can repeat (the kernel may hand back a port just released), and `ray start` refuses two of its
    components on one port ("is trying to use a port number ... used by other components")."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray(args: list[str], env: dict) -> None:
    proc = subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise SystemExit(f"ray {' '.join(args[:2])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


NODE_PORTS = 6  # ports _node_ports names per node


def _node_ports(ports: list[int]) -> list[str]:
    # Worker ports below the kernel's ephemeral range (32768+), where every free_ports() port lands, and
    # above the ports `ray start` takes by default on every node (client server 10001, dashboard 8265):
    # a range over 10001 makes a worker node's start fail
    lo = random.randrange(10400, 30000, 200)
    flags = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    assert len(ports) == len(flags)
    return [*(a for flag, port in zip(flags, ports) for a in (flag, str(port))),
            "--min-worker-port", str(lo), "--max-worker-port", str(lo + 200)]


def start(directory: Path, workers: int, cpus: int, object_store_mb: int) -> dict:
    directory = directory.resolve()
    if (directory / STATE).exists():
        raise SystemExit(f"{directory} already holds a cluster; stop it first or choose another --dir")
    temp = directory / "ray"
    temp.mkdir(parents=True, exist_ok=True)
    # MARKER: every process of this cluster inherits it (agents rename themselves, so their command
    # lines no longer name the temp folder; without it, stop would leave them running)
    # RAY_worker_niceness: Ray would start workers at nice 15, and a training worker run by a
    # non-root user cannot move itself back to 0 (emergence_ray/priority.py)
    env = {"RAY_worker_niceness": "0", **os.environ, "RAY_AUTH_MODE": "token", MARKER: str(directory)}
    env.pop("RAY_ADDRESS", None)
    # every port of every node chosen at once, so no two components of the cluster share one
    ports = free_ports(3 + NODE_PORTS * (1 + workers))
    (gcs_port, dash_port, client_port), ports = ports[:3], ports[3:]
    node_ports = [ports[i:i + NODE_PORTS] for i in range(0, len(ports), NODE_PORTS)]
    store = ["--object-store-memory", str(object_store_mb * 1024 * 1024)]
    before = set(_pids_under(directory))
    _ray(["start", "--head", "--port", str(gcs_port), "--temp-dir", str(temp), "--num-cpus", str(cpus),
          "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
          "--ray-client-server-port", str(client_port), "--disable-usage-stats", *store,
          *_node_ports(node_ports[0])], env)
    for i in range(workers):
        _ray(["start", "--address", f"127.0.0.1:{gcs_port}", "--num-cpus", str(cpus), "--disable-usage-stats",
              "--resources", json.dumps({f"node_{i + 1}": 1}), *store, *_node_ports(node_ports[i + 1])], env)
    time.sleep(1)
    state = {"gcs_address": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash_port}",
             "temp_dir": str(temp), "workers": workers,
             "pids": sorted(set(_pids_under(directory)) - before)}
    (directory / STATE).write_text(json.dumps(state, indent=2))
    return state


def _pids_under(directory: Path) -> list[int]:
    """Processes of this cluster: those started with its MARKER in their environment or whose
    command line names its folder (raylets, GCS, dashboard, workers, the client server), and every
    descendant of those (a worker node's raylet starts its agents without the marker, and the agents
    rename themselves)."""
    key = str(directory.resolve()).encode()
    marker = f"{MARKER}=".encode() + key + b"\0"
    ours, parent = set(), {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if key in (proc / "cmdline").read_bytes() or marker in (proc / "environ").read_bytes() + b"\0":
                ours.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    grown = True
    while grown:
        found = {pid for pid, ppid in parent.items() if ppid in ours} - ours
        grown = bool(found)
        ours |= found
    mine, pid = set(), os.getppid()  # never this process's callers (a shell naming the folder)
    while pid > 1 and pid not in mine:
        mine.add(pid)
        pid = parent.get(pid, 0)
    return sorted(ours - mine)


def stop(directory: Path, timeout: float = 5.0) -> int:
    """SIGTERM to this cluster's processes, `timeout` s of grace, then SIGKILL to what is left (its
    raylet and GCS, terminated together, were seen still running 25 s after SIGTERM)."""
    directory = directory.resolve()
    pids = set(_pids_under(directory))  # only processes of this cluster, whoever else runs Ray here
    state_file = directory / STATE
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
    state_file.unlink(missing_ok=True)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["start", "stop", "address", "status"])
    p.add_argument("--dir", type=Path, required=True, help="this cluster's own folder (temp dir, state file)")
    p.add_argument("--workers", type=int, default=0, help="worker nodes besides the head")
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs per node")
    p.add_argument("--object-store-mb", type=int, default=512)
    args = p.parse_args(argv)
    if args.command == "start":
        print(json.dumps(start(args.dir, args.workers, args.cpus, args.object_store_mb), indent=2))
    elif args.command == "stop":
        print(f"stopped {stop(args.dir)} processes")
    else:
        state_file = args.dir.resolve() / STATE
        if not state_file.exists():
            print(f"no cluster in {args.dir}", file=sys.stderr)
            return 1
        state = json.loads(state_file.read_text())
        print(state["dashboard"] if args.command == "address" else json.dumps(state, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
