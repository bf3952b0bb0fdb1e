"""A real multi-node Ray cluster on loopback for tests: a head started with `ray start --head` (token auth
on, as Ray 2.60 heads require) plus worker nodes, each in its own process group so a test stops exactly
the processes it started (never `ray stop`, which stops every Ray on the machine).

All nodes share 127.0.0.1, so they are told apart by node id. Worker nodes are started with
`python -m tp2d_exp.testing.ray_cluster node ...` (ray._private.node.Node, as ray.cluster_utils.Cluster does): the
`ray start --address` CLI refuses to join a loopback head unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and
with it set rewrites 127.0.0.1 to the machine's external IP, where the head does not listen.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tp2d_exp.testing.local_ranks import free_port, free_ports

ROOT = Path(__file__).resolve().parents[2]  # the checkout (worker nodes run from it)
RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE = 200 * 1024 * 1024  # small: the machine is shared
LOOPBACK_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # =0: Ray keeps 127.0.0.1 rather than the network IP


def _agent_ports() -> list[str]:
    # Fixed defaults (8265, 52365, ...) would collide with other Ray instances on the machine.
    flags = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
    return [*(x for flag, port in zip(flags, free_ports(len(flags))) for x in (flag, str(port))),
            "--min-worker-port", "0", "--max-worker-port", "0"]


class LoopbackCluster:
    """`with LoopbackCluster(cpus_per_node=[2, 2]) as c:` a head and len-1 worker nodes; c.address, c.env
    (the environment a client needs: the cluster's token, auth mode on); c.nodes (worker nodes by Ray node
    id), c.kill_node and c.add_node to lose and regain machines."""

    def __init__(self, cpus_per_node: list[int], start_timeout: float = 60,
                 node_env: dict[str, str] | None = None):
        """`node_env`: extra variables of the nodes' processes (Ray's system config, e.g. faster health checks)."""
        self.cpus_per_node, self.start_timeout, self.node_env = cpus_per_node, start_timeout, node_env or {}
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Unix socket paths are limited
        self.token = uuid.uuid4().hex
        # A client needs no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the launcher keeps a loopback address on
        # loopback itself); the nodes do (see _spawn).
        self.env = {**{k: v for k, v in os.environ.items() if k != LOOPBACK_FLAG}, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": self.token}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}  # worker nodes by Ray node id (the head is not among them)

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(Path(self.temp_dir, log), "w")
        proc = subprocess.Popen(args, env={**self.env, **self.node_env, LOOPBACK_FLAG: "0"}, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # its own process group: stopped as one
        self.procs.append(proc)
        return proc

    def __enter__(self) -> "LoopbackCluster":
        try:
            return self._start()
        except RuntimeError:  # a head that timed out on a loaded machine (GCS "Deadline Exceeded"): once more
            self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
            self.port = free_port()
            self.address = f"127.0.0.1:{self.port}"
            return self._start()

    def _start(self) -> "LoopbackCluster":
        try:
            self._spawn([RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                         "--num-cpus", str(self.cpus_per_node[0]), "--num-gpus", "0",
                         "--object-store-memory", str(OBJECT_STORE), "--include-dashboard", "false",
                         "--dashboard-port", str(free_port()), "--temp-dir", self.temp_dir, "--disable-usage-stats",
                         *_agent_ports()], "head.log")
            self._wait(lambda: Path(self.temp_dir, "ray_current_cluster").exists(), "head")
            for cpus in self.cpus_per_node[1:]:
                self.add_node(cpus)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, cpus: int) -> str:
        """Start one more worker node (a node that comes back is a new one, with a new id); its Ray node id."""
        i = len(self.nodes) + 1
        alive = 1 + sum(p.poll() is None for p in self.nodes.values()) + 1
        node = self._spawn([sys.executable, "-m", "tp2d_exp.testing.ray_cluster", "node", self.address, str(cpus),
                            self.temp_dir, str(alive)], f"node{i}.log")
        self._wait(lambda: node.poll() is not None or "ready" in self.log(f"node{i}.log"), f"node {i}")
        if node.poll() is not None:
            raise RuntimeError(f"node {i} exited: {self.log(f'node{i}.log')[-2000:]}")
        node_id = self.log(f"node{i}.log").split("ready ", 1)[1].split()[0]
        self.nodes[node_id] = node
        return node_id

    def drain_node(self, node_id: str, deadline_s: int) -> None:
        """A preemption notice, as a cloud's spot termination reaches Ray: the node is drained with a deadline
        (`ray drain-node`; killing it at the deadline is the caller's part, as it is the cloud's)."""
        subprocess.run([RAY, "drain-node", "--address", self.address, "--node-id", node_id,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed",
                        "--deadline-remaining-seconds", str(deadline_s)],
                       env={**self.env, LOOPBACK_FLAG: "0"}, check=True, capture_output=True, timeout=60)

    def kill_node(self, node_id: str) -> None:
        """What a lost machine looks like to Ray: the node's raylet and every process on it killed at once
        (its Ray workers run in sessions of their own, so they are found as descendants, not by group)."""
        node = self.nodes[node_id]
        for pid in [*_descendants(node.pid), node.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _kill_group(node, graceful=False)

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, name: str) -> str:
        path = Path(self.temp_dir, name)
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait(self, ready, what: str) -> None:
        deadline = time.time() + self.start_timeout
        while not ready():
            if time.time() > deadline or any(p.poll() is not None for p in self.procs[:1]):
                raise RuntimeError(f"{what} did not start: {self.log('head.log')[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the processes this cluster started (worker nodes first), by process group."""
        for proc in reversed(self.procs):
            _kill_group(proc)
        self.procs.clear()
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: the parent of each)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_group(proc: subprocess.Popen, graceful: bool = True) -> None:
    if graceful:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # Ray's children outlive a SIGTERM to the group leader
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _run_node(gcs_address: str, num_cpus: int, temp_dir: str, nodes_expected: int) -> None:
    """A worker node joining the head at gcs_address on 127.0.0.1; runs until SIGTERM."""
    import ray
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=0,
        object_store_memory=OBJECT_STORE, min_worker_port=0, max_worker_port=0, node_manager_port=0,
        include_log_monitor=False, temp_dir=temp_dir)
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    signal.signal(signal.SIGTERM, lambda *_: (node.kill_all_processes(check_alive=False, allow_graceful=True),
                                              os._exit(0)))
    ray.init(address=gcs_address)  # wait until the head lists this node as alive
    while sum(n["Alive"] for n in ray.nodes()) < nodes_expected:
        time.sleep(0.2)
    ray.shutdown()
    print(f"ready {node.node_id}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__" and sys.argv[1] == "node":
    _run_node(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
