"""The Ray cluster a job runs on, checked on the driver before any worker starts.

- connect: start Ray locally (cluster.address=null) or attach to a running cluster ("auto", "host:port",
  "ray://host:port") with token authentication on, shipping the project's code as the job's working dir;
- check_resources: the cluster's nodes can hold tp*dp workers (not just its totals: Ray Train V2 retries a
  placement that no node layout satisfies forever);
- before_launch: warn about busy resources and TP groups wider than any node, and bound how long Ray Train
  waits for a busy cluster;
- check_shared_paths: on more than one node, the paths workers write and read (Ray storage, the run dir,
  the corpus cache) are the same files on every node;
- worker_env: the variables workers need, forwarded explicitly (Ray does not pass the driver's environment).
Every failure is a one-line ConfigError with what was asked, what the cluster has and the fix.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tp2d_exp.config import ConfigError, is_uri

log = logging.getLogger(__name__)

# Forwarded to workers: W&B credentials and target, HF caches/offline switches/token, and the log levels
# and network-interface choices of the collectives (multi-node NCCL/gloo runs often need the interface).
FORWARDED_ENV = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_ENTITY", "HF_HOME", "HF_HUB_CACHE",
                 "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "TRANSFORMERS_OFFLINE",
                 "TRANSFORMERS_VERBOSITY", "TORCH_DISTRIBUTED_DEBUG", "TORCH_CPP_LOG_LEVEL", "NCCL_DEBUG",
                 "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
# Not shipped to remote nodes with the code: run outputs, environments, VCS data, caches.
WORKING_DIR_EXCLUDES = ["outputs/", ".venv/", "venv/", ".git/", "__pycache__/", ".pytest_cache/", "*.egg-info/",
                        "wandb/", ".ci/"]
ADDRESS = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
TOKEN_HELP = ("put the cluster's token (`ray get-auth-token` on its head node) in ~/.ray/auth_token or "
              "RAY_AUTH_TOKEN")


def check_config(c: dict[str, Any]) -> None:
    """Cluster keys that cannot work, before any connection."""
    address = c["address"]
    if address is not None and address != "auto" and not ADDRESS.match(address):
        raise ConfigError(f"cluster.address={address!r} is not an address; use null (local Ray), auto (the "
                          "cluster started on this machine), host:port (a head's GCS) or ray://host:port")
    if address and address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise ConfigError(f"cluster.address={address} uses Ray Client, which needs `pip install 'ray[client]'`; "
                          "or run on the head node with cluster.address=auto")
    if c["resource_wait_s"] <= 0:
        raise ConfigError(f"cluster.resource_wait_s={c['resource_wait_s']} must be positive")


def connect(c: dict[str, Any], world_size: int, project_root: str) -> float:
    """Start or attach to Ray; the seconds it took (0 when already connected). Attaching ships the project
    (code and conf/) as the job's working dir."""
    import ray

    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": c["verbose"],
                              "logging_level": logging.INFO if c["verbose"] else logging.ERROR}
    address = c["address"]
    if not address:
        # A fresh local Ray, loopback only ("local": never a cluster `ray start` left running here), with
        # enough logical CPUs for tp*dp workers even on a small machine (they share cores; the math holds).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(world_size * c["cpus_per_worker"])),
                 _node_ip_address="127.0.0.1", **kwargs)
        log.info("started a local Ray in %.1fs", time.perf_counter() - t0)
        return time.perf_counter() - t0
    # Heads started with `ray start` require token auth; a client presents its token only in token mode.
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        ray._raylet.Config.initialize("")  # Ray read the mode at import; re-read it, as `ray start` does
    host = address.removeprefix("ray://").rsplit(":", 1)[0]
    if host in LOOPBACK and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "").lower() not in ("0", "false"):
        # Ray rewrites a loopback address to this machine's network IP, where a loopback head does not listen.
        raise ConfigError(f"cluster.address={address} is a loopback head: run with "
                          "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment so Ray stays on 127.0.0.1")
    if not address.startswith("ray://") and address != "auto":
        _preflight(address)
    runtime_env = {"working_dir": project_root, "excludes": WORKING_DIR_EXCLUDES}
    try:
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
    except ray.exceptions.AuthenticationError as e:
        raise _auth_error(address, e) from None
    except ConnectionError as e:
        raise ConfigError(f"cluster.address={address}: could not attach ({_first_line(e)}); start the cluster "
                          "(`ray start --head`) or fix the address") from None
    log.info("attached to the Ray cluster at %s (%d nodes) in %.1fs", address,
             sum(n["Alive"] for n in ray.nodes()), time.perf_counter() - t0)
    return time.perf_counter() - t0


def _preflight(address: str) -> None:
    """Unreachable or unauthenticated in seconds, where ray.init retries for 20-40 s and then says only
    "Failed to connect"."""
    import ray
    from ray._raylet import GcsClient  # ray is pinned to 2.60.x (pyproject); the GCS client reports auth

    host, port = address.rsplit(":", 1)
    if os.environ["RAY_AUTH_MODE"].lower() == "token" and not _token_available():
        # Checked here: Ray's GCS client aborts the process (a failed C++ check) when the token is missing.
        raise _auth_error(address, missing=True)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"cluster.address={address}: nothing answers there ({e.strerror or e}); start the "
                          "head with `ray start --head --port <port>` or fix the address") from None
    try:
        GcsClient(address=address).internal_kv_get(b"tp2d_exp", b"tp2d_exp", timeout=10)
    except ray.exceptions.AuthenticationError as e:
        raise _auth_error(address, e) from None
    except ray.exceptions.RpcError as e:
        raise ConfigError(f"cluster.address={address}: no Ray head answers there ({_first_line(e)}); "
                          "check the address (the head's --port)") from None


def _token_available() -> bool:
    """Where Ray looks for the token: RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.is_file() and bool(path.read_text().strip())


def _auth_error(address: str, e: Exception | None = None, missing: bool = False) -> ConfigError:
    missing = missing or "no authentication token was found" in str(e)
    return ConfigError(f"cluster.address={address}: " + (
        "token auth is on (RAY_AUTH_MODE=token) but no token was found here; " if missing else
        "the cluster rejected this machine's auth token; ") + TOKEN_HELP)


@dataclass(frozen=True)
class Capacity:
    """What the cluster holds for this job's workers."""

    use_gpu: bool
    kind: str  # the resource a worker reserves: GPU, or CPU on a CPU-only run
    per_worker: float
    total: float  # of `kind`, over the alive nodes
    free: float  # not held by other jobs right now
    workers_per_node: dict[str, int]  # node id -> workers it can hold

    @property
    def max_per_node(self) -> int:
        return max(self.workers_per_node.values(), default=0)


def check_resources(cfg: dict[str, Any]) -> Capacity:
    """Decide CPU or GPU, and fail fast when no layout of tp*dp workers over the alive nodes exists."""
    import ray

    c = cfg["cluster"]
    world = cfg["parallelism"]["tp"] * cfg["parallelism"]["dp"]
    nodes = [n for n in ray.nodes() if n["Alive"]]
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    if c["device"] == "cuda" and gpus == 0:
        raise ConfigError("cluster.device=cuda but the Ray cluster has no GPUs; use cluster.device=auto or cpu, "
                          "or attach to a GPU cluster (cluster.address)")
    use_gpu = c["device"] == "cuda" or (c["device"] == "auto" and gpus > 0)
    # What Ray Train reserves per worker (ScalingConfig): 1 GPU, or cluster.cpus_per_worker CPUs.
    kind, each = ("GPU", 1.0) if use_gpu else ("CPU", float(c["cpus_per_worker"]))
    have = {n["NodeID"]: n["Resources"].get(kind, 0) for n in nodes}
    fits = {node: int(amount // each) for node, amount in have.items()}
    total = sum(have.values())
    per_node = "+".join(f"{v:g}" for v in have.values())
    inventory = f"{total:g} {kind}s on {len(nodes)} node{'s' * (len(nodes) != 1)} ({per_node})"
    asked = f"parallelism: tp*dp={world} workers of {each:g} {kind} each"
    if world * each > total:
        fix = ("lower parallelism.tp/parallelism.dp or add GPU nodes" if use_gpu else
               "lower parallelism.tp/parallelism.dp or cluster.cpus_per_worker, or add nodes")
        raise ConfigError(f"{asked} need {world * each:g} {kind}s but the Ray cluster has {inventory}; {fix}")
    if world > sum(fits.values()):
        raise ConfigError(f"{asked} do not fit the nodes of the Ray cluster ({inventory}): each node holds "
                          f"{'+'.join(map(str, fits.values()))} = {sum(fits.values())} workers; pick a "
                          f"cluster.cpus_per_worker that divides the {kind}s per node, lower parallelism.dp, "
                          f"or add nodes")
    return Capacity(use_gpu, kind, each, total, ray.available_resources().get(kind, 0), fits)


def before_launch(cfg: dict[str, Any], capacity: Capacity) -> str | None:
    """Say what the launch will meet (busy resources, idle GPUs, TP groups that cannot fit a node) and bound
    Ray Train's wait for resources. Returns the TP-span warning, if any."""
    c, tp = cfg["cluster"], cfg["parallelism"]["tp"]
    world = tp * cfg["parallelism"]["dp"]
    if world * capacity.per_worker > capacity.free:
        log.warning("only %g of the cluster's %g %ss are free (other jobs hold the rest); waiting up to "
                    "cluster.resource_wait_s=%gs for them", capacity.free, capacity.total, capacity.kind,
                    c["resource_wait_s"])
    if capacity.use_gpu and world < capacity.total:
        log.warning("using %d of the cluster's %g GPUs", world, capacity.total)
    # Ray Train V2 waits this long for the workers' placement group, then (controller_failure_limit) gives up.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(c["resource_wait_s"])
    # Hook: an analytic comm model (issue 3's tp2d_exp.analysis) can pass tp_span_warning's predicted_cost.
    warning = tp_span_warning(tp, capacity)
    if warning:
        log.warning("%s", warning)
    return warning


def tp_span_warning(tp: int, capacity: Capacity, predicted_cost: str | None = None) -> str | None:
    """Before launch: one line when no node can hold a whole TP group. `predicted_cost` is where an analytic
    comm model (e.g. tp2d_exp.analysis, when present) states the expected slowdown."""
    if tp <= capacity.max_per_node:
        return None
    text = (f"parallelism.tp={tp} is larger than any node holds (at most {capacity.max_per_node} workers per "
            f"node): every TP group spans nodes and its per-layer all-reduces cross the inter-node network; "
            f"prefer tp <= devices per node and more dp")
    return f"{text}; {predicted_cost}" if predicted_cost else text


def _read_files(paths: list[str]) -> list[str | None]:
    out: list[str | None] = []
    for path in paths:
        try:
            out.append(Path(path).read_text())
        except OSError:
            out.append(None)
    return out


def unseen_files(files: dict[str, str]) -> dict[str, list[str]]:
    """For each alive node, the paths in `files` (path -> expected content) that it does not see with that
    content: one task per node, pinned there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    read = ray.remote(_read_files)
    paths = list(files)
    refs = [read.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(paths) for node in nodes]
    seen = ray.get(refs, timeout=120)
    return {node: [p for p, got in zip(paths, contents) if got != files[p]] for node, contents in zip(nodes, seen)}


def check_shared_paths(cfg: dict[str, Any]) -> None:
    """On a multi-node cluster, every path workers use must be the same directory on every node: checked by
    writing a marker here and reading it back on each node (a URI storage_path is shared by definition)."""
    import ray

    if sum(n["Alive"] for n in ray.nodes()) < 2:
        return
    keys = {"cluster.storage_path": cfg["storage_path"], "the run dir (hydra.run.dir)": cfg["output_dir"],
            "the corpus/tokenizer cache (outputs/cache)": cfg["cache_dir"]}
    markers = {}
    for key, path in keys.items():
        if not is_uri(path):
            marker = Path(path) / f".tp2d_shared_check_{uuid.uuid4().hex}"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(marker.name)
            markers[str(marker)] = key
    try:
        unseen = unseen_files({m: Path(m).name for m in markers})
    finally:
        for m in markers:
            Path(m).unlink()
    for key, path in keys.items():
        blind = [node for node, missing in unseen.items() if any(markers[m] == key for m in missing)]
        if blind:
            raise ConfigError(
                f"{key}={path} is not shared: {len(blind)} of the cluster's {len(unseen)} nodes do not see it "
                f"(node {blind[0][:12]}...); on several nodes use a filesystem every node mounts at the same "
                "path (NFS, Lustre) or, for cluster.storage_path, a URI such as s3://bucket/ray")


def worker_env(cfg: dict[str, Any]) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if not cfg["cluster"]["address"]:
        # A local start runs the workers from this checkout; attached runs get the job's working dir instead.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [cfg["project_root"], os.environ.get("PYTHONPATH")]))
    return env


def startup_error(e: BaseException, cfg: dict[str, Any]) -> str | None:
    """Ray Train's start-up timeout as a sentence that says what to do, else None."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    cause = getattr(e, "controller_failure", None)
    if not isinstance(cause, WorkerGroupStartupTimeoutError):
        return None
    return (f"the cluster did not free the resources of {cause.num_workers} workers within cluster.resource_wait_s="
            f"{cfg['cluster']['resource_wait_s']:g}s (other jobs hold them); retry later, raise "
            "cluster.resource_wait_s, or use fewer workers")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
