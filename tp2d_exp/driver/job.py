"""One job from composed config to objective, run.py's whole body:

    compose (Hydra) -> spec -> validate -> plan | (prepare -> launch) -> summary.json -> objective

A job that never starts (a ConfigError of any validation stage, or a cluster that cannot give it its workers
in time) fails in one line with exit code 2; one that fails in training, with exit code 1. Under -m the job
is recorded as failed and the sweep goes on. summary.json is written here, once, from the RunSummary.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from omegaconf import DictConfig

from tp2d_exp.config.errors import ConfigError
from tp2d_exp.config.spec import JobContext, JobSpec, build_spec, run_name
from tp2d_exp.config.validate import check_config
from tp2d_exp.records import Mesh, RunStatus, RunSummary, write_json


def hydra_context() -> JobContext:
    """Where Hydra put the running job (inside @hydra.main only)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return JobContext(root=Path(hc.runtime.cwd), output_dir=Path(hc.runtime.output_dir),
                      job_num=hc.job.num if multirun else None, sweep_dir=Path(hc.sweep.dir) if multirun else None)


def _train(spec: JobSpec) -> RunSummary:
    from tp2d_exp.driver import cluster
    from tp2d_exp.driver.launch import launch
    from tp2d_exp.driver.prepare import prepare

    # An existing cluster is attached to (and checked) before the data work, so a wrong address, token or
    # size fails in seconds; a local Ray starts only once the job is known to be valid.
    connect_s = cluster.connect_and_check(spec).connect_s if spec.cluster.address else None
    return launch(prepare(spec), connect_s)


def run_job(cfg: DictConfig, ctx: JobContext) -> float:
    """The job's objective for Hydra: the final held-out loss, else the final training loss (plan_only: the
    predicted step time); NaN when there was
    nothing left to train; inf for a failed job under -m. A failed single run exits (2: before any worker
    started, 1: in training)."""
    spec = None
    try:
        spec = build_spec(cfg, ctx)
        check_config(spec)  # before the heavy imports of the stages below, so a bad value fails in about a second
        if spec.run.plan_only:
            from tp2d_exp.perf.planner import make_plan, render

            summary = make_plan(spec)
            print(render(summary))
        else:
            summary = _train(spec)
    except ConfigError as e:
        if spec is None:  # the spec itself could not be built (e.g. parallelism.tp=0)
            summary = RunSummary(run_name=run_name(cfg.run.name, ctx), mesh=Mesh(tp=cfg.parallelism.tp,
                                                                                  dp=cfg.parallelism.dp))
        else:
            summary = RunSummary.of(spec)
        summary.failure, summary.error = e.failure, str(e)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(ctx.output_dir / "summary.json", summary)
    return _objective(summary, multirun=ctx.job_num is not None, out=ctx.output_dir)


def _objective(s: RunSummary, multirun: bool, out: Path) -> float:
    if s.status is RunStatus.planned:
        return s.plan.step_time_s
    if s.status is RunStatus.failed:
        print(f"error: {s.error}", file=sys.stderr)
        if multirun:
            return math.inf  # the sweep goes on; this job is recorded as failed
        raise SystemExit(2 if s.never_started else 1)
    if s.already_done:
        print(f"nothing to train: run {s.run_name} is already at step {s.resumed_from_step}")
        return math.nan
    if s.final_loss is None:  # completed, yet no row: nothing to report a loss from
        print(f"done: no step logged; outputs in {out}")
        return math.nan
    val = f", val loss {s.final_val_loss:.4f}" if s.final_val_loss is not None else ""
    print(f"done: {s.steps} steps, loss {s.first_loss:.4f} -> {s.final_loss:.4f}{val}, {s.tokens_per_s:.0f} tokens/s "
          f"on {s.mesh_name} in {s.wall_time_s:.0f}s; outputs in {out}")
    # A sweeper optimises held-out loss when there is one, not the loss of the last training batch.
    return s.final_val_loss if s.final_val_loss is not None else s.final_loss
