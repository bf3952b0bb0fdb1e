"""Launch one job on Ray Train: check the cluster, run the TorchTrainer with the frozen job spec as every
worker's train_loop_config, and return the run's summary (tp2d_exp.driver.job writes it)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

from tp2d_exp.config.errors import ConfigError
from tp2d_exp.config.schema import Device
from tp2d_exp.config.spec import JobSpec
from tp2d_exp.config.validate import Capacity
from tp2d_exp.credentials import Handoff, hand_off
from tp2d_exp.driver import cluster
from tp2d_exp.driver.elastic import Attempts, run_fits
from tp2d_exp.driver.progress import ProgressBar
from tp2d_exp.driver.summary import collect
from tp2d_exp.records import FailureKind, RunStatus, RunSummary
from tp2d_exp.storage import is_uri

log = logging.getLogger(__name__)


def make_trainer(spec: JobSpec, capacity: Capacity, credentials: Handoff):
    """The TorchTrainer of a prepared job; every worker gets the frozen JobSpec and the handoff of the
    credentials (tp2d_exp.credentials) as its train_loop_config."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from tp2d_exp.train.worker import train_worker

    r = spec.resolved
    return TorchTrainer(
        train_worker,
        # The frozen JobSpec, pickled to every worker. Wrapped in a dict: Ray Train V2 types train_loop_config
        # as one (its state tracking validates that), and train_worker unwraps it. Credentials never travel
        # in the runtime env below (Ray logs it): only their handoff, which holds no value, is in this dict.
        train_loop_config={"spec": spec, "credentials": credentials},
        torch_config=TorchConfig(backend="nccl" if capacity.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.dims.world_size, use_gpu=capacity.use_gpu,
            resources_per_worker=None if capacity.use_gpu else {"CPU": spec.cluster.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=r.run_name, storage_path=r.storage_path,
            # A start-up that times out (cluster.resource_wait_s) is retried no more than a failed run:
            # V2's default is to retry it forever.
            # Elastic, the driver's loop (tp2d_exp.driver.elastic) restarts, on the mesh that fits then: a fit
            # ends at its first failure or preemption. Otherwise Ray retries failures on the same mesh; a
            # preemption the workers checkpointed for ends the fit cleanly either way.
            failure_config=ray.train.FailureConfig(
                max_failures=0 if spec.cluster.elastic else spec.run.max_failures,
                controller_failure_limit=0 if spec.cluster.elastic else spec.run.max_failures,
                max_preemption_failures=0 if spec.cluster.elastic else -1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.run.num_to_keep),
            worker_runtime_env={"env_vars": cluster.worker_env(spec)}),
    )


def launch(spec: JobSpec, connect_s: Optional[float] = None) -> RunSummary:
    """Run one prepared job through Ray Train and return its summary, failed ones included. `connect_s`: the
    attach the driver made earlier (before preparing data, so that a wrong address fails in seconds); else
    Ray is started here. Validation's cluster stage runs here, on the cluster as it is now."""
    from tp2d_exp.train.mesh import Placement

    t0 = time.time()
    summary = RunSummary.of(spec)
    out = Path(spec.resolved.output_dir)
    bar = ProgressBar(out / "metrics.jsonl", spec.steps_left)
    tp_warning, gave_up = None, False
    attempts = Attempts()
    try:
        connection = cluster.connect_and_check(spec)
        summary.ray_connect_s = round(connect_s if connect_s is not None else connection.connect_s, 2)
        capacity = connection.capacity
        cluster.check_shared_paths(spec)
        log.info("cluster checked after %.1fs", time.time() - t0)
        tp_warning = cluster.before_launch(spec, capacity)
        summary.warnings = [w for w in (tp_warning, cluster.memory_warning(spec, capacity)) if w] or None
        spec = spec.with_resolved(device=Device.cuda if capacity.use_gpu else Device.cpu)
        summary.device = str(spec.resolved.device)
        if sys.stderr.isatty():
            print(f"starting {spec.dims.world_size} Ray workers ({spec.dims.name}, {spec.resolved.device}); "
                  f"logs in {out}", file=sys.stderr)
        with hand_off(attached=bool(spec.cluster.address)) as credentials:
            bar.start()
            result = run_fits(spec, capacity, lambda on: make_trainer(on, capacity, credentials).fit(), out, attempts,
                              _root_cause)
        summary.status = RunStatus.completed
        log.info("training finished after %.1fs", time.time() - t0)
        summary.checkpoint = checkpoint_uri(result.checkpoint.path, spec) if result.checkpoint else None
    except ConfigError as e:  # the cluster stage: nothing was launched
        summary.failure, summary.error = e.failure, str(e)
    except Exception as e:  # noqa: BLE001 - the summary must say why a run failed
        timeout = cluster.startup_error(e, spec)
        summary.error = timeout or _root_cause(e)
        summary.failure = FailureKind.resources if timeout else FailureKind.worker_fault
        gave_up = getattr(e, "worker_failures", None) is not None
    finally:
        if bar.is_alive():
            bar.stop.set()
            bar.join()
    summary.wall_time_s = round(time.time() - t0, 2)
    collect(summary, out)
    summary.preemptions = attempts.preemptions
    # Elastic, the driver counted them; otherwise Ray restarted after each but the last (gave_up), and the
    # driver's own restarts were preemptions.
    summary.failures = attempts.failures if spec.cluster.elastic else \
        max(0, (summary.restarts or 0) - attempts.preemptions) + gave_up
    if attempts.warnings:
        summary.warnings = [*(summary.warnings or []), *attempts.warnings]
    placement_warning = Placement.from_report(summary.placement).warning() if summary.placement else None
    if placement_warning and not tp_warning:  # said once: before launch when it was predictable
        log.warning("%s", placement_warning)
        summary.warnings = [*(summary.warnings or []), placement_warning]
    if gave_up:
        summary.error += (f" (gave up after {summary.failures - 1} restart(s): "
                          f"run.max_failures={spec.run.max_failures})")
    if summary.status is RunStatus.failed:
        log.error("training failed: %s", summary.error)
    return summary


def checkpoint_uri(path: str, spec: JobSpec) -> str:
    """Ray gives a checkpoint's path inside its filesystem (`bucket/...` for s3://bucket/...); the summary
    names it as run.resume_from and scripts/export_hf.py take it."""
    storage = spec.resolved.storage_path
    return f"{storage.split('://', 1)[0]}://{path.lstrip('/')}" if is_uri(storage) and not is_uri(path) else path


def _root_cause(e: BaseException) -> str:
    """The innermost worker error as one line, not Ray's wrapper."""
    while True:
        inner = getattr(e, "worker_failures", None) or {}
        # A lost worker (its process died or stopped answering) is the cause; the other ranks' errors are
        # broken collectives that follow from it.
        lost = [(rank, f.health_check_failure) for rank, f in inner.items() if hasattr(f, "health_check_failure")]
        if lost:
            rank, failure = lost[0]
            return f"{type(failure).__name__}: worker rank {rank} was lost (its process died or stopped answering)"
        if inner:
            e = next(iter(inner.values()))
            continue
        if e.__cause__ is not None:
            e = e.__cause__
            continue
        break
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"
