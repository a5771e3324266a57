"""A multi-node Ray cluster on one machine, from the plain `ray start` commands (tests and
scripts/bench_cluster.py; docs/DISTRIBUTED.md "Trying it on one machine").

Each node is one `ray start ... --block` process in its own session and process group, with its
own `--temp-dir` under `root` and explicit free ports, so it never meets another Ray instance on
the machine (no `/tmp/ray/ray_current_cluster` is written or read). `stop()` ends exactly these
processes: each node's process group, then any process still naming `root` in its command line
(never `ray stop`, which kills every Ray instance of the user).

    cluster = LocalCluster("/tmp/crc_1234")
    address = cluster.start([2, 2])                    # head + one node, alive: "127.0.0.1:PORT"
    worker = cluster.nodes[1]                          # (or start_head / add_node / wait_for_nodes)
    ...                                                # python -m calray.sweep S.yaml --address $address
    cluster.kill_raylet(worker)                        # the node dies as if its machine went away
    cluster.stop()

`add_node(hide=[path, ...])` starts the node in its own mount namespace (`unshare -m`, root on
Linux) where each path is covered by an empty tmpfs: on that node the directory exists but holds
other files than on the driver's — what a node-local disk at the same path looks like.
Ray runs with `RAY_AUTH_MODE=disabled` (set it for drivers of this cluster too: `env()`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

IP = "127.0.0.1"
# node-death detection in seconds instead of ~30 s (the GCS' health checks of each raylet)
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "3"}


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((IP, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    node_manager_port: int
    hidden: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class LocalCluster:
    """Ray head and worker nodes on this machine (module doc)."""

    def __init__(self, root: str | Path, env: dict[str, str] | None = None, include_dashboard: bool = False):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.include_dashboard = include_dashboard
        self.nodes: list[Node] = []
        self.address: str | None = None
        self._env = {**os.environ, "RAY_AUTH_MODE": "disabled", **FAST_HEALTH_CHECKS, **(env or {})}
        self._ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))

    def env(self) -> dict[str, str]:
        """The environment for a driver of this cluster (auth as the nodes)."""
        return {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def _start(self, name: str, args: list[str], hide: list[str] | None) -> Node:
        nm, om, metrics, agent, agent_grpc, rtenv, lo = free_ports(7)
        temp = self.root / name
        cmd = [self._ray, "start", *args, "--node-ip-address", IP, "--temp-dir", str(temp), "--block",
               "--disable-usage-stats", "--node-manager-port", str(nm), "--object-manager-port", str(om),
               "--metrics-export-port", str(metrics), "--dashboard-agent-listen-port", str(agent),
               "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rtenv),
               "--min-worker-port", str(lo), "--max-worker-port", str(lo + 200)]
        hidden = [str(Path(p).resolve()) for p in hide or []]
        if hidden:
            for p in hidden:
                Path(p).mkdir(parents=True, exist_ok=True)
            mounts = " && ".join(f"mount -t tmpfs calray-hidden {shlex.quote(p)}" for p in hidden)
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f"{mounts} && exec {' '.join(shlex.quote(c) for c in cmd)}"]
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(cmd, env=self._env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        node = Node(name, proc, log, nm, hidden)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: float, resources: dict | None = None) -> str:
        port, client, dash = free_ports(3)
        args = ["--head", "--port", str(port), "--ray-client-server-port", str(client),
                "--num-cpus", f"{num_cpus:g}", f"--include-dashboard={str(self.include_dashboard).lower()}",
                "--dashboard-port", str(dash)]
        if resources:
            args += ["--resources", _json(resources)]
        self._start("head", args, None)
        self.address = f"{IP}:{port}"
        return self.address

    def add_node(self, num_cpus: float, resources: dict | None = None, hide: list[str | Path] | None = None) -> Node:
        if self.address is None:
            raise RuntimeError("start_head() first")
        args = ["--address", self.address, "--num-cpus", f"{num_cpus:g}"]
        if resources:
            args += ["--resources", _json(resources)]
        return self._start(f"node{len(self.nodes)}", args, [str(p) for p in hide or []])

    def start(self, node_cpus: list[float], hide: dict[int, list[str | Path]] | None = None,
              attempts: int = 3) -> str:
        """The head (node_cpus[0]) and one node per further entry, alive; `hide[i]`: node i's hidden
        paths. A node that exits or never registers (a port `free_ports` handed out was taken by
        another process before Ray bound it) stops the whole cluster, which starts again on new
        ports, up to `attempts` times; the last failure is raised."""
        for attempt in range(1, attempts + 1):
            try:
                self.start_head(num_cpus=node_cpus[0])
                for i, cpus in enumerate(node_cpus[1:], start=1):
                    self.add_node(num_cpus=cpus, hide=(hide or {}).get(i))
                self.wait_for_nodes(len(node_cpus), timeout_s=90.0)
                return self.address
            except (RuntimeError, TimeoutError):
                self.stop()
                if attempt == attempts:
                    raise
                for node in self.nodes:  # keep the failed attempt's logs, out of the next one's way
                    for path in (self.root / node.name, node.log):
                        if path.exists():
                            path.rename(path.with_name(f"{path.name}.attempt{attempt}"))
                self.nodes, self.address = [], None
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- state

    def alive_nodes(self) -> list[dict]:
        """`ray list nodes`-like records of the alive nodes (needs `ray.init(address=self.address)`)."""
        import ray

        return [n for n in ray.nodes() if n.get("Alive")]

    def wait_for_nodes(self, n: int, timeout_s: float = 180.0) -> None:
        """Until `n` nodes are alive (queried with a short-lived `ray status`-free GCS client)."""
        from ray._raylet import GcsClient

        t0 = time.time()
        while time.time() - t0 < timeout_s:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited ({node.proc.returncode}): "
                                       f"{node.log.read_text()[-2000:]}")
            try:
                alive = [i for i in GcsClient(address=self.address).get_all_node_info(timeout=5).values()
                         if i.state == 0]  # GcsNodeInfo.ALIVE
                if len(alive) >= n:
                    return
            except Exception:  # noqa: BLE001 - the GCS is not up yet
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout_s:.0f}s (logs in {self.root})")

    def raylet_pid(self, node: Node) -> int:
        pids = [p for p in descendants(node.pid) if _comm(p) == "raylet"]
        if not pids:
            raise RuntimeError(f"no raylet under ray node {node.name} (pid {node.pid})")
        return pids[0]

    def kill_raylet(self, node: Node) -> int:
        """SIGKILL the node's raylet: its workers die with it and `ray start --block` tears the rest
        of the node down, as when a machine is lost. Returns the raylet's pid."""
        pid = self.raylet_pid(node)
        os.kill(pid, signal.SIGKILL)
        return pid

    # ---------------------------------------------------------------- stop

    def _own_pids(self) -> list[int]:
        root = str(self.root)
        me = os.getpid()
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me and root in _cmdline(int(p))]

    def stop(self, timeout_s: float = 10.0) -> None:
        """End every process of this cluster: the nodes' process groups, then stragglers naming `root`."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for node in self.nodes:
                pids = [node.pid, *descendants(node.pid)]
                try:
                    os.killpg(node.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                for pid in pids:
                    _signal(pid, sig)
            for pid in self._own_pids():
                _signal(pid, sig)
            t0 = time.time()
            while time.time() - t0 < (timeout_s if sig == signal.SIGTERM else 5.0):
                if all(n.proc.poll() is not None for n in self.nodes) and not self._own_pids():
                    return
                time.sleep(0.5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _json(d: dict) -> str:
    import json

    return json.dumps(d)
