"""The Ray cluster a job runs on, checked on the driver before any worker starts.

- connect: start Ray locally (cluster.address=null) or attach to a running cluster ("auto", "host:port",
  "ray://host:port") with token authentication on, shipping the project's code as the job's working dir;
- connect_and_check: connect, then validation's cluster stage (tp2d_exp.config.validate.check_cluster) on
  the alive nodes' resources;
- before_launch: warn about busy resources and TP groups wider than any node, and bound how long Ray Train
  waits for a busy cluster; memory_warning: the plan's predicted peak against a node's memory;
- check_shared_paths: on more than one node, the paths workers write and read (Ray storage, the run dir,
  the corpus cache) are the same files on every node;
- worker_env: the variables workers need, forwarded explicitly (Ray does not pass the driver's environment
  to an attached cluster's workers); credentials are not among them (tp2d_exp.credentials).
Connection failures are one-line ConfigErrors with what was asked, what the cluster has and the fix.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tp2d_exp.config.errors import ConfigError, first_line
from tp2d_exp.config.schema import ClusterConfig
from tp2d_exp.config.spec import JobSpec
from tp2d_exp.config.validate import Capacity, check_cluster
from tp2d_exp.storage import is_uri

log = logging.getLogger(__name__)

# Forwarded to workers in Ray's runtime env, which Ray writes into its session logs, so nothing secret: the
# W&B target, HF caches and offline switches, the object storage endpoint and profile (a cluster.storage_path
# URI), and the log levels and network-interface choices of the collectives (multi-node NCCL/gloo runs often
# need the interface). Tokens and keys reach the workers by tp2d_exp.credentials.
FORWARDED_ENV = ("WANDB_BASE_URL", "WANDB_MODE", "WANDB_ENTITY", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE",
                 "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY",
                 "TORCH_DISTRIBUTED_DEBUG", "TORCH_CPP_LOG_LEVEL", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
                 "GLOO_SOCKET_IFNAME", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 "GOOGLE_APPLICATION_CREDENTIALS")
# Not shipped to remote nodes with the code: run outputs, environments, VCS data, caches.
WORKING_DIR_EXCLUDES = ["outputs/", ".venv/", "venv/", ".git/", "__pycache__/", ".pytest_cache/", "*.egg-info/",
                        "wandb/", ".ci/"]
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
TOKEN_HELP = ("put the cluster's token (`ray get-auth-token` on its head node) in ~/.ray/auth_token or "
              "RAY_AUTH_TOKEN")


def connect(c: ClusterConfig, world_size: int, project_root: str) -> float:
    """Start or attach to Ray; the seconds it took (0 when already connected). Attaching ships the project
    (code and conf/) as the job's working dir."""
    import ray

    needed = math.ceil(world_size * c.cpus_per_worker)
    if ray.is_initialized():
        if c.address or ray.cluster_resources().get("CPU", 0) >= needed:
            return 0.0
        # The local Ray an earlier job of this sweep started is too small for this one (-m over tp1_dp2 and
        # tp2_dp2): start it again, larger.
        ray.shutdown()
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": c.verbose,
                              "logging_level": logging.INFO if c.verbose else logging.ERROR}
    address = c.address
    if not address:
        # A fresh local Ray, loopback only ("local": never a cluster `ray start` left running here), with
        # enough logical CPUs for tp*dp workers even on a small machine (they share cores; the math holds).
        # Its processes, the workers included, inherit this environment: credentials too (tp2d_exp.credentials).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed),
                 _node_ip_address="127.0.0.1", **kwargs)
        log.info("started a local Ray in %.1fs", time.perf_counter() - t0)
        return time.perf_counter() - t0
    # Heads started with `ray start` require token auth; a client presents its token only in token mode.
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        _reread_ray_config()
    if address.removeprefix("ray://").rsplit(":", 1)[0] in LOOPBACK:
        _stay_on_loopback()
    if not address.startswith("ray://") and address != "auto":
        _preflight(address)
    runtime_env = {"working_dir": project_root, "excludes": WORKING_DIR_EXCLUDES}
    try:
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
    except ray.exceptions.AuthenticationError as e:
        raise _auth_error(address, e) from None
    except ConnectionError as e:
        raise ConfigError(f"cluster.address={address}: could not attach ({first_line(e)}); start the cluster "
                          "(`ray start --head`) or fix the address") from None
    log.info("attached to the Ray cluster at %s (%d nodes) in %.1fs", address,
             sum(n["Alive"] for n in ray.nodes()), time.perf_counter() - t0)
    return time.perf_counter() - t0


def _reread_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE once, at import; re-read it, as `ray start` does. Private (ray is pinned to
    2.60.x in pyproject): Ray has no public way to switch a client into token mode after import."""
    import ray

    ray._raylet.Config.initialize("")


def _stay_on_loopback() -> None:
    """Ray resolves a loopback address to this machine's network IP, where a head on 127.0.0.1 does not listen,
    unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a variable it reads once, at import (ray may be imported by
    now), into a module constant. That constant is set here, so the user sets nothing. Private (ray is pinned
    to 2.60.x): it is read where Ray picks this machine's node IP (ray._private.services.get_node_ip_address)."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _preflight(address: str) -> None:
    """Unreachable or unauthenticated in seconds, where ray.init retries for 20-40 s and then says only
    "Failed to connect". The GCS client is private (ray pinned to 2.60.x): the only one that reports an auth
    failure without a full ray.init."""
    import ray
    from ray._raylet import GcsClient

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
        raise ConfigError(f"cluster.address={address}: no Ray head answers there ({first_line(e)}); "
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
class Connection:
    connect_s: float  # starting or attaching to Ray (0 when this process was connected already)
    capacity: Capacity


def connect_and_check(spec: JobSpec) -> Connection:
    """Connect to Ray, then validation's cluster stage on the alive nodes' resources."""
    import ray

    connect_s = connect(spec.cluster, spec.dims.world_size, spec.resolved.project_root)
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    # Elastic, the job can start short (tp2d_exp.driver.elastic): the cluster must hold its smallest mesh.
    smallest = spec.with_dp(spec.cluster.min_dp) if spec.cluster.elastic else spec
    return Connection(connect_s, check_cluster(smallest, nodes, ray.available_resources()))


def before_launch(spec: JobSpec, capacity: Capacity) -> str | None:
    """Say what the launch will meet (busy resources, idle GPUs, TP groups that cannot fit a node) and bound
    Ray Train's wait for resources. Returns the TP-span warning, if any."""
    world = spec.dims.world_size
    if world * capacity.per_worker > capacity.free:
        log.warning("only %g of the cluster's %g %ss are free (other jobs hold the rest); waiting up to "
                    "cluster.resource_wait_s=%gs for them", capacity.free, capacity.total, capacity.kind,
                    spec.cluster.resource_wait_s)
    if capacity.use_gpu and world < capacity.total:
        log.warning("using %d of the cluster's %g GPUs", world, capacity.total)
    # Ray Train V2 waits this long for the workers' placement group, then (controller_failure_limit) gives up.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(spec.cluster.resource_wait_s)
    warning = tp_span_warning(spec.dims.tp, capacity)
    if warning:
        log.warning("%s", warning)
    return warning


def memory_warning(spec: JobSpec, capacity: Capacity) -> str | None:
    """Before launch: the plan's one line when the predicted peak does not fit a node (planner.memory_guard),
    also on stderr: a run that will be OOM-killed should say so before it starts."""
    from tp2d_exp.perf.planner import memory_guard

    if spec.resolved.evaluate_only:  # no gradients, optimizer step or saved activations: not a training peak
        return None
    warning = memory_guard(spec, capacity.use_gpu, *node_memory(spec, capacity))
    if warning:
        log.warning("%s", warning)
        print(f"warning: {warning}", file=sys.stderr)
    return warning


def node_memory(spec: JobSpec, capacity: Capacity) -> tuple[float, int, int]:
    """(bytes, ranks, other processes' bytes) the memory guard compares with: a GPU's memory (hardware.gpu's
    row) and one rank; on CPU, for a local Ray the RAM available now on this machine (the driver and Ray
    already run and are not in it), else the smallest node's Ray memory with the driver and Ray's processes
    beside the workers, and the most workers a node takes."""
    from tp2d_exp.perf.planner import CPU_DRIVER_BYTES

    if capacity.use_gpu:
        return spec.hardware.gpus[spec.hardware.gpu].memory_gib * 2**30, 1, 0
    ranks = min(spec.dims.world_size, capacity.max_per_node)
    if spec.cluster.address is None:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(meminfo["MemAvailable"].split()[0]) * 1024, ranks, 0
    return min(capacity.memory_per_node.values(), default=math.inf), ranks, CPU_DRIVER_BYTES


def tp_span_warning(tp: int, capacity: Capacity) -> str | None:
    """Before launch: one line when no node can hold a whole TP group."""
    if tp <= capacity.max_per_node:
        return None
    return (f"parallelism.tp={tp} is larger than any node holds (at most {capacity.max_per_node} workers per "
            f"node): every TP group spans nodes and its per-layer all-reduces cross the inter-node network; "
            f"prefer tp <= devices per node and more dp")


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


def check_shared_paths(spec: JobSpec) -> None:
    """On a multi-node cluster, every path workers use must be the same directory on every node: checked by
    writing a marker here and reading it back on each node (a URI storage_path is shared by definition)."""
    import ray

    from tp2d_exp.data.dataset import store_root

    if sum(n["Alive"] for n in ray.nodes()) < 2:
        return
    r = spec.resolved
    keys = {"cluster.storage_path": r.storage_path, "the run dir (hydra.run.dir)": r.output_dir,
            "the corpus/tokenizer cache (outputs/cache)": r.cache_dir,
            "data.store_dir (the token stores)": str(store_root(spec))}
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


def worker_env(spec: JobSpec) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if not spec.cluster.address:
        # A local start runs the workers from this checkout; attached runs get the job's working dir instead.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [spec.resolved.project_root, os.environ.get("PYTHONPATH")]))
    return env


def startup_error(e: BaseException, spec: JobSpec) -> str | None:
    """Ray Train's start-up timeout as a sentence that says what to do, else None. The exception type is
    private (ray.train.v2._internal, ray pinned to 2.60.x): Ray exports no public type for this failure."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    cause = getattr(e, "controller_failure", None)
    if not isinstance(cause, WorkerGroupStartupTimeoutError):
        return None
    return (f"the cluster did not free the resources of {cause.num_workers} workers within cluster.resource_wait_s="
            f"{spec.cluster.resource_wait_s:g}s (other jobs hold them); retry later, raise "
            "cluster.resource_wait_s, or use fewer workers")
