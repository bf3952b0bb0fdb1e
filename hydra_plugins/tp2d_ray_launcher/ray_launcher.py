"""`hydra/launcher=ray`: a sweep's jobs (`run.py -m ...`) as Ray tasks on the attached cluster
(cluster.address), as many at a time as its CPUs or GPUs hold, each exactly the job the basic launcher runs:
its run dir (hydra.sweep.dir/<num>), Ray run name, W&B run and summary.json.

- The launcher attaches with the project's own cluster.connect (token auth, loopback, the project as the job's
  working dir) before any job starts; a missing cluster.address or a failed attach is one line, exit code 2.
- A job is admitted only when its workers (tp*dp x cluster.cpus_per_worker CPUs, or tp*dp GPUs) fit the
  cluster's total besides the jobs already running, in job order; a job that does not fit waits here, not in
  Ray Train (where it would fail after cluster.resource_wait_s). The job's task itself reserves nothing.
- Inside its task a job runs Hydra's run_job from the driver's working dir (relative hydra.sweep.dir, data
  paths and outputs/ resolve to the driver's paths: on several nodes a filesystem every node mounts at the same
  path, which the job's check_shared_paths enforces), with the driver's non-secret variables in the task's
  runtime env and the credentials from the GCS key-value store (tp2d_exp.credentials: the task gets the key
  they wait under, their values are in no runtime env and no task argument).
- Hydra's job callbacks run here, in the launcher's process, where their state lives (the sweep report
  collects its job dirs in on_job_end and writes the report in on_multirun_end).
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module outside sys.modules, where
# dataclasses cannot resolve string annotations.
import logging
import math
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NoReturn, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

import tp2d_exp
from tp2d_exp.config.errors import ConfigError, first_line
from tp2d_exp.config.schema import Device
from tp2d_exp.credentials import Handoff, hand_off
from tp2d_exp.records import FailureKind, Mesh, RunSummary, read_json, write_json

log = logging.getLogger(__name__)

PROJECT_ROOT = str(Path(tp2d_exp.__file__).resolve().parent.parent)  # what the job tasks run: this checkout


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.tp2d_ray_launcher.ray_launcher.RayLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="tp2d_exp")


@dataclass
class SweepJob:
    num: int
    overrides: list[str]
    config: DictConfig  # the job's composed config, Hydra's runtime fields set as run_job sets them
    kind: str  # the resource its workers reserve: CPU or GPU
    need: float  # of `kind`

    @property
    def output_dir(self) -> Path:
        return Path(self.config.hydra.runtime.output_dir)


def admits(job: SweepJob, running: Iterable[SweepJob], total: Mapping[str, float]) -> bool:
    """Whether `job`'s workers fit the cluster's total (ray.cluster_resources()) besides those of the jobs
    already running. Counted from the jobs, not from Ray's free resources: a job just started holds nothing
    yet. A job larger than the whole cluster runs alone, and fails in its own cluster check, in one line."""
    running = list(running)
    return not running or job.need + sum(r.need for r in running if r.kind == job.kind) <= total.get(job.kind, 0)


def _fail(message: str) -> NoReturn:
    """Before any job started: one line and exit code 2, as run.py's own validation does."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class RayLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Attach to the cluster before any job starts, so a missing address, a wrong token or a head nobody
        answers on fails the sweep once, in one line."""
        from tp2d_exp.driver import cluster

        if not config.cluster.address:
            _fail("hydra/launcher=ray needs cluster.address=<head>:<port> (a running Ray cluster, see README "
                  "'Several machines'); without a cluster drop hydra/launcher=ray: the basic launcher runs the "
                  "jobs one at a time on a local Ray")
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        try:
            cluster.connect(OmegaConf.to_object(config.cluster), 1, PROJECT_ROOT)
        except ConfigError as e:
            _fail(str(e))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        total = ray.cluster_resources()
        jobs = [self._job(initial_job_idx + i, list(o), total.get("GPU", 0) > 0) for i, o in enumerate(job_overrides)]
        log.info("Launching %d jobs on the Ray cluster at %s (%s)", len(jobs), self.config.cluster.address,
                 ", ".join(f"{total.get(k, 0):g} {k}s" for k in ("CPU", "GPU")))
        pending, running = deque(jobs), {}
        results: dict[int, JobReturn] = {}
        with hand_off(attached=True) as credentials:
            while pending or running:
                # In job order: a job that does not fit waits here for the jobs ahead of it to end (none
                # overtakes it, so a large job is not starved by small ones), not in Ray Train, which would
                # fail it after cluster.resource_wait_s.
                while pending and admits(pending[0], running.values(), total):
                    job = pending.popleft()
                    running[self._submit(job, credentials)] = job
                [done], _ = ray.wait(list(running), num_returns=1)
                job = running.pop(done)
                results[job.num] = self._collect(job, done)
        return [results[job.num] for job in jobs]

    def _job(self, num: int, overrides: list[str], cluster_has_gpus: bool) -> SweepJob:
        """The job's config as the basic launcher composes it, and the workers it will ask the cluster for."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
            # What run_job computes, from the same cwd (the task works from it too): for the callbacks here.
            config.hydra.runtime.output_dir = os.path.abspath(
                os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)))
        workers = config.parallelism.tp * config.parallelism.dp
        # As Ray Train reserves (tp2d_exp.config.validate.check_cluster): a GPU each when the run uses GPUs.
        use_gpu = config.cluster.device is Device.cuda or (config.cluster.device is Device.auto and cluster_has_gpus)
        kind, need = ("GPU", workers) if use_gpu else ("CPU", workers * config.cluster.cpus_per_worker)
        return SweepJob(num, overrides, config, kind, 0.0 if config.run.plan_only else float(need))

    def _submit(self, job: SweepJob, credentials: Handoff) -> Any:
        import ray

        from ray.train.v2._internal.constants import get_env_vars_to_propagate

        from tp2d_exp.driver.cluster import FORWARDED_ENV

        log.info("\t#%d : %s (%g %s%s)", job.num, " ".join(filter_overrides(job.overrides)), job.need, job.kind,
                 "s" * (job.need != 1))
        self.hydra_context.callbacks.on_job_start(config=job.config, task_function=self.task_function)
        # The task inherits the job's runtime env that cluster.connect set (the project as working dir: Ray takes
        # a local dir only there), merged with its own: the task's process starts from the node's environment,
        # not this one, so the variables a job's driver passes on (the W&B target, HF caches and offline
        # switches, Ray Train's own settings, which it propagates from the process that calls fit(): private,
        # ray pinned to 2.60.x; none secret) travel here. Child actors (Ray Train's controller, its workers)
        # inherit both.
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ} | get_env_vars_to_propagate()
        task = ray.remote(
            num_cpus=0,  # the job's driver only waits on its workers; they reserve the job's resources
            max_calls=1,  # a fresh process per job: credentials, Ray Train and W&B state end with the job
            max_retries=0,  # a lost job is recorded as failed, not started again under the same run name
        )(_run_job).options(runtime_env={"env_vars": env}, name=f"sweep job {job.num}")
        # The task runs run_job with no callbacks: they run here (on_job_start above, on_job_end in _collect).
        context = HydraContext(config_loader=self.hydra_context.config_loader,
                               callbacks=type(self.hydra_context.callbacks)())
        return task.remote(context, self.task_function, job.config, Singleton.get_state(), credentials)

    def _collect(self, job: SweepJob, ref: Any) -> JobReturn:
        import ray

        try:
            ret = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the task itself was lost (its process died) or could not start
            ret = self._lost(job, e)
        # The job's own lines (done: ..., error: ...) are in its task's log; the sweep's console gets its outcome.
        summary_file = job.output_dir / "summary.json"
        if summary_file.exists():
            s = read_json(RunSummary, summary_file)
            (log.warning if s.error else log.info)("\t#%d : %s%s; outputs in %s", job.num, s.status,
                                                   f": {s.error}" if s.error else "", job.output_dir)
        else:  # the task function raised: Hydra's sweeper raises it once the sweep ends, as the basic launcher's
            log.warning("\t#%d : %s", job.num, ret.status.name.lower())
        self.hydra_context.callbacks.on_job_end(config=job.config, job_return=ret)
        return ret

    def _lost(self, job: SweepJob, e: Exception) -> JobReturn:
        """A job whose task failed outside run_job: recorded as a failed job (summary.json, objective inf), and
        the sweep goes on, as for a job that failed in training."""
        from tp2d_exp.config.spec import JobContext, run_name

        c = job.config
        cause = getattr(e, "cause", None) or e  # a RayTaskError wraps what the task raised
        error = f"the job's Ray task failed: {type(cause).__name__}: {first_line(cause)}"
        summary_file = job.output_dir / "summary.json"
        if not summary_file.exists():
            ctx = JobContext(root=Path(c.hydra.runtime.cwd), output_dir=job.output_dir, job_num=job.num,
                             sweep_dir=Path(str(c.hydra.sweep.dir)))
            job.output_dir.mkdir(parents=True, exist_ok=True)
            write_json(summary_file, RunSummary(run_name=run_name(c.run.name, ctx),
                                                mesh=Mesh(tp=c.parallelism.tp, dp=c.parallelism.dp),
                                                failure=FailureKind.worker_fault, error=error))
        task_cfg = OmegaConf.masked_copy(c, [k for k in c if k != "hydra"])
        ret = JobReturn(overrides=job.overrides, cfg=task_cfg, hydra_cfg=OmegaConf.masked_copy(c, "hydra"),
                        working_dir=c.hydra.runtime.cwd, task_name=JobRuntime.instance().get("name"),
                        status=JobStatus.COMPLETED)
        ret.return_value = math.inf
        return ret


def _run_job(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig,
             singleton_state: dict[Any, Any], credentials: Handoff) -> JobReturn:
    """In the job's Ray task: Hydra's run_job, as the basic launcher calls it, from the driver's working dir."""
    cwd = config.hydra.runtime.cwd
    if not os.path.isdir(cwd):
        raise RuntimeError(f"the sweep's working dir {cwd} does not exist on this node; run the sweep from a "
                           "filesystem every node mounts at the same path (NFS, Lustre)")
    # Ray started this process in its copy of the working dir; the job resolves relative paths (hydra.sweep.dir,
    # data.path, ...) against the driver's, as under the basic launcher.
    os.chdir(cwd)
    credentials.install()
    setup_globals()
    Singleton.set_state(singleton_state)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
