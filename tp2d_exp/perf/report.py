"""Turn a sweep dir (one job dir per mesh, each with summary.json and metrics.jsonl) into report.md, PNG plots
and, when W&B is on, a W&B table: one row per mesh, measured next to predicted, and the mesh it would pick.

Real runs report what they measured (throughput, collectives, profiler split, peak memory) beside the
analytic prediction; plan_only jobs (status "planned") report the prediction on their hardware profile.
Entry points: `python scripts/sweep_report.py <sweep dir>`, and the Hydra callback `SweepReport`, which
writes the report when `python run.py -m ...` ends. Jobs are read back as RunSummary (tp2d_exp.records),
the same type the driver wrote.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

from tp2d_exp.config.errors import first_line
from tp2d_exp.records import RunStatus, RunSummary, StepRow, read_json, read_rows, to_dict

log = logging.getLogger(__name__)
MB, GiB = 1e6, 2**30


@dataclass
class JobResult:
    dir: Path
    summary: RunSummary
    rows: list[StepRow] = field(default_factory=list)  # metrics.jsonl

    @property
    def mesh(self) -> str:
        return self.summary.mesh_name

    @property
    def planned(self) -> bool:
        return self.summary.status is RunStatus.planned


def load_jobs(sweep_dir: Path) -> list[JobResult]:
    """Job dirs in Hydra's job order (0, 1, ...)."""
    dirs = [d for d in sweep_dir.iterdir() if (d / "summary.json").is_file()]
    return [JobResult(d, read_json(RunSummary, d / "summary.json"), read_rows(d / "metrics.jsonl"))
            for d in sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name))]


@dataclass
class ReportRow:
    """A job's row of the report: plain numbers, None where the job has no such figure."""

    job: str
    mesh: str
    status: RunStatus
    source: str  # measured (device) | plan (hardware, gpu)
    global_batch_size: Optional[int]
    error: Optional[str]
    tp_bytes: Optional[float]  # measured on one step for real runs, predicted for plans
    dp_bytes: Optional[float]
    tp_bytes_predicted: Optional[float]
    dp_bytes_predicted: Optional[float]
    tokens_per_s: Optional[float] = None
    tokens_per_s_per_device: Optional[float] = None
    step_time_s: Optional[float] = None
    comm_share: Optional[float] = None
    peak_memory_bytes: Optional[float] = None
    fits: Optional[bool] = None
    mfu: Optional[float] = None
    final_loss: Optional[float] = None
    val_loss: Optional[float] = None  # the job's final held-out loss (data.val_fraction), the same on every mesh
    bytes_match: Optional[bool] = None
    state_bytes: Optional[int] = None
    state_bytes_predicted: Optional[int] = None
    peak_memory_predicted: Optional[float] = None  # the plan's peak (GPU reserved, CPU RSS)
    tp_exposed_s: Optional[float] = None  # plans: TP collectives on the critical path, per step
    dp_exposed_s: Optional[float] = None  # plans: what of FSDP's communication compute does not hide

    def cells(self) -> dict[str, Any]:
        """Every column, None as null (a table keeps its columns), the status as its value."""
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}


def row_of(job: JobResult) -> ReportRow:
    s = job.summary
    predicted = s.comm.predicted_bytes if s.comm else None
    dims = (s.comm.measured_bytes or predicted) if s.comm else None
    row = ReportRow(job=job.dir.name, mesh=job.mesh, status=s.status, source="—", global_batch_size=s.global_batch_size,
                    error=s.error, tp_bytes=dims["tp"].bytes if dims else None,
                    dp_bytes=dims["dp"].bytes if dims else None,
                    tp_bytes_predicted=predicted["tp"].bytes if predicted else None,
                    dp_bytes_predicted=predicted["dp"].bytes if predicted else None)
    if job.planned:
        plan = s.plan
        return dataclasses.replace(row, source=f"plan ({plan.hardware}, {plan.gpu})", tokens_per_s=plan.tokens_per_s,
                                   tokens_per_s_per_device=plan.tokens_per_s_per_device, step_time_s=plan.step_time_s,
                                   comm_share=plan.comm_share, peak_memory_bytes=s.memory.predicted.total,
                                   peak_memory_predicted=s.memory.predicted.total, fits=s.memory.fits, mfu=plan.mfu,
                                   tp_exposed_s=plan.tp_exposed_s, dp_exposed_s=plan.dp_exposed_s)
    memory = s.memory
    states = [r.total for r in (memory.state_bytes_per_rank or []) if r] if memory else []
    return dataclasses.replace(
        row, source=f"measured ({s.device})" if s.device else "—", tokens_per_s=s.tokens_per_s,
        tokens_per_s_per_device=s.tokens_per_s_per_device, step_time_s=s.step_time_s,
        comm_share=s.comm.profile.comm_share if s.comm and s.comm.profile else None,
        peak_memory_bytes=(memory.peak_reserved_bytes or memory.peak_bytes) if memory else None,
        peak_memory_predicted=memory.predicted.total if memory else None, mfu=s.mfu, final_loss=s.final_loss,
        val_loss=s.final_val_loss,
        bytes_match=s.comm.matches_prediction if s.comm else None, state_bytes=max(states, default=None),
        state_bytes_predicted=memory.predicted.states if memory else None)


def pick(rows: list[ReportRow]) -> tuple[Optional[ReportRow], str]:
    """The mesh with the highest (measured or predicted) tokens/s among those that ran or fit."""
    ok = [r for r in rows if r.status in (RunStatus.completed, RunStatus.planned) and r.fits is not False
          and r.tokens_per_s]
    if not ok:
        return None, "No mesh completed (or fits), so there is nothing to pick; see the status column."
    ranked = sorted(ok, key=lambda r: -r.tokens_per_s)
    best = ranked[0]
    what = "predicted" if best.status is RunStatus.planned else "measured"
    reason = f"**Pick: {best.mesh}**, the highest {what} throughput ({best.tokens_per_s:,.0f} tokens/s"
    if len(ranked) > 1:
        reason += f", {best.tokens_per_s / ranked[1].tokens_per_s:.2f}x the next best, {ranked[1].mesh}"
    reason += ")."
    if best.tp_bytes is not None:
        reason += f" Per step and rank it moves {_mb(best.tp_bytes)} MB over tp and {_mb(best.dp_bytes)} MB over dp"
        reason += f"; communication takes {best.comm_share:.0%} of the step" if best.comm_share is not None else ""
        reason += "."
    if best.status is RunStatus.planned:
        reason += (f" Predicted MFU {best.mfu:.1%}; exposed communication per step: TP {best.tp_exposed_s * 1e3:,.0f} ms,"
                   f" DP {best.dp_exposed_s * 1e3:,.0f} ms.")
    if best.peak_memory_bytes:
        reason += f" Peak memory {_gib(best.peak_memory_bytes)} GiB per rank"
        reason += " (predicted reserved, fits)." if best.status is RunStatus.planned else " (measured)."
    too_big = [r.mesh for r in rows if r.fits is False]
    if too_big:
        reason += f" Left out, they do not fit in GPU memory: {', '.join(too_big)}."
    failed = [r.mesh for r in rows if r.status is RunStatus.failed]
    if failed:
        reason += f" Failed: {', '.join(failed)} (see status)."
    if best.source.startswith("measured (cpu"):
        reason += (" On CPU the workers share a few cores, so this ranks the meshes' overheads, not GPU speed;"
                   " plan the GPU run with run.plan_only=true.")
    if len({r.global_batch_size for r in ok}) > 1:
        reason += " The jobs differ in global batch size: compare tokens/s, not loss curves."
    return best, reason


def _mb(n: Optional[float]) -> str:
    return "—" if n is None else f"{n / MB:,.2f}"


def _gib(n: Optional[float]) -> str:
    return "—" if n is None else f"{n / GiB:.3f}"


def _ms(seconds: Optional[float]) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:,.1f}"


def _num(n: Optional[float], fmt: str) -> str:
    return "—" if n is None else format(n, fmt)


COLUMNS = ["job", "mesh", "status", "tokens/s", "tokens/s/device", "step time (s)", "TP MB/step", "DP MB/step",
           "bytes = predicted", "comm share", "TP exposed (ms)", "DP exposed (ms)", "peak mem/rank (GiB)",
           "peak mem predicted (GiB)", "state GiB meas / pred", "final loss", "val loss", "MFU", "source"]


def markdown_row(r: ReportRow) -> list[str]:
    match = {True: "exact", False: "differs", None: "—"}[r.bytes_match]
    state = "—" if r.state_bytes is None else f"{_gib(r.state_bytes)} / {_gib(r.state_bytes_predicted)}"
    status = str(r.status) if r.fits is not False else "planned, does not fit"
    return [r.job, r.mesh, status, _num(r.tokens_per_s, ",.0f"), _num(r.tokens_per_s_per_device, ",.0f"),
            _num(r.step_time_s, ".4f"), _mb(r.tp_bytes), _mb(r.dp_bytes), match, _num(r.comm_share, ".1%"),
            _ms(r.tp_exposed_s), _ms(r.dp_exposed_s), _gib(r.peak_memory_bytes), _gib(r.peak_memory_predicted), state, _num(r.final_loss, ".4f"), _num(r.val_loss, ".4f"),
            _num(r.mfu, ".1%"), r.source]


def render(sweep_dir: Path, jobs: list[JobResult], rows: list[ReportRow], plots: dict[str, str]) -> str:
    best, reason = pick(rows)
    lines = [f"# Mesh sweep: {sweep_dir.name}", "", reason, "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(markdown_row(r)) + " |" for r in rows]
    lines += ["", "How to read it: tokens/s counts each sample once per DP replica (tokens/s/device divides by "
              "tp x dp); TP and DP MB are the message bytes per step and rank of the collectives on each mesh dim "
              "(measured on one step for real runs, predicted for plans); `bytes = predicted` says whether the "
              "measured collectives equal the analytic model's; comm share is the step time spent in (exposed) "
              "communication (profiler for real runs, indicative on CPU; the time model for plans); TP / DP exposed "
              "is the plan's communication time per step that compute does not hide; peak memory "
              "is the CUDA allocator's peak reserved memory on GPU, the process peak RSS on CPU, the prediction for "
              "plans, next to the prediction; "
              "state is params + grads + optimizer shards per rank, measured vs predicted; val loss is the job's last "
              "held-out loss (— without a held-out split, data.val_fraction=0).", ""]
    lines += [f"- {r.mesh} failed: {r.error}" for r in rows if r.error]
    per_rank = [(j.mesh, j.summary.memory.peak_bytes_per_rank) for j in jobs
                if j.summary.memory and j.summary.memory.peak_bytes_per_rank]
    if per_rank:
        lines += ["", "Peak memory per rank (GiB):", ""]
        lines += [f"- {mesh}: " + ", ".join(_gib(b) for b in peaks) for mesh, peaks in per_rank]
    lines += [""] + [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def make_plots(jobs: list[JobResult], rows: list[ReportRow], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    meshes = [r.mesh for r in rows]

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=90)
        plt.close(fig)
        plots[name] = f"{out.name}/{name}.png"

    curves = [j for j in jobs if j.rows]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for j in curves:
            ax.plot([r.step for r in j.rows], [r.loss for r in j.rows], marker="o", ms=3, label=j.mesh)
        ax.set(xlabel="step", ylabel="loss", title="Loss per mesh (same global batches: curves coincide)")
        ax.legend()
        save(fig, "loss")

    # Only jobs that evaluated (data.val_fraction > 0): a sweep without a held-out split gets no empty plot.
    evaluated = [(j, vals) for j in jobs if (vals := [r for r in j.rows if r.val_loss is not None])]
    if evaluated:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for j, vals in evaluated:
            ax.plot([r.step for r in vals], [r.val_loss for r in vals], marker="o", ms=3, label=j.mesh)
        ax.set(xlabel="step", ylabel="held-out loss",
               title="Held-out loss per mesh (same global batches: curves coincide)")
        ax.legend()
        save(fig, "val_loss")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(meshes, [r.tokens_per_s or 0 for r in rows], color="tab:blue")
    ax.set(ylabel="tokens/s", title="Throughput per mesh" + (" (predicted)" if all(j.planned for j in jobs) else ""))
    save(fig, "throughput")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tp = [(r.tp_bytes or 0) / MB for r in rows]
    dp = [(r.dp_bytes or 0) / MB for r in rows]
    ax.bar(meshes, tp, label="tp (activation all-reduces)", color="tab:orange")
    ax.bar(meshes, dp, bottom=tp, label="dp (FSDP all-gather / reduce-scatter)", color="tab:green")
    ax.set(ylabel="MB per step and rank", title="Communication by mesh dim",
           ylim=(0, 1.3 * max([t + d for t, d in zip(tp, dp)] + [1e-9])))
    ax.legend(fontsize=7, loc="upper left")
    save(fig, "comm_bytes")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    parts = ("params", "grads", "optimizer", "gathered_params", "activations")
    bottom = [0.0] * len(rows)
    predicted = [j.summary.memory.predicted if j.summary.memory else None for j in jobs]
    for part in parts:
        vals = [getattr(p, part) / GiB if p else 0.0 for p in predicted]
        ax.bar(meshes, vals, bottom=bottom, label=f"predicted {part}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    measured = [(i, r.peak_memory_bytes / GiB) for i, r in enumerate(rows)
                if r.peak_memory_bytes and r.status is not RunStatus.planned]
    if measured:
        ax.scatter([meshes[i] for i, _ in measured], [v for _, v in measured], color="black", zorder=3,
                   label="measured peak (max over ranks)")
    cpu = any(r.source == "measured (cpu)" for r in rows)
    ax.set(ylabel="GiB per rank", title="Memory per mesh" + (" (CPU peak RSS includes the Python runtime)" if cpu else ""))
    ax.legend(fontsize=7)
    save(fig, "memory")
    return plots


def _logger_of(job_dir: Path):
    """The sweep's W&B settings, from the first job's composed config (its .hydra/config.yaml), typed by the
    schema; None when that job has no Hydra record."""
    from omegaconf import OmegaConf

    from tp2d_exp.config.schema import LoggerConfig, structured

    hydra_cfg = job_dir / ".hydra" / "config.yaml"
    if not hydra_cfg.exists():
        return None
    return OmegaConf.to_object(OmegaConf.merge(structured(LoggerConfig), OmegaConf.load(hydra_cfg).logger))


def log_wandb(sweep_dir: Path, jobs: list[JobResult], rows: list[ReportRow], plots: dict[str, str]) -> Optional[str]:
    """A W&B run in the sweep's group (job_type "report") with the table and plots, when the sweep's jobs
    had W&B on; returns its local dir."""
    from tp2d_exp.config.schema import LoggerBackend, WandbMode
    from tp2d_exp.config.spec import resolve_wandb_mode

    lg = _logger_of(jobs[0].dir)
    if lg is None or lg.backend is LoggerBackend.none:
        return None
    mode = resolve_wandb_mode(lg.mode)
    if mode is WandbMode.disabled:
        return None
    import wandb

    from tp2d_exp.train.tracking import FINISH_TIMEOUT_S, INIT_TIMEOUT_S

    # The jobs' own group (the sweep id under outputs/multirun, unless logger.group was set).
    group = next((j.summary.wandb_group for j in jobs if j.summary.wandb_group), lg.group or f"sweep-{sweep_dir.name}")
    # Bounded as the jobs' runs are (tp2d_exp.train.tracking): a W&B that does not answer costs seconds, and
    # the report is recorded offline for `wandb sync`, not after W&B's own 90 s timeout.
    settings = wandb.Settings(console="off", silent=True, finish_timeout=FINISH_TIMEOUT_S,
                              init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S)))
    args = dict(project=lg.project, entity=lg.entity, group=group, name=f"report-{sweep_dir.name}",
                job_type="report", dir=str(sweep_dir), reinit="finish_previous", settings=settings)
    try:
        run = wandb.init(**args, mode=str(mode))
    except Exception as e:  # noqa: BLE001 - unreachable, or the key refused
        if mode is WandbMode.offline:
            raise
        log.warning("W&B init of the sweep report failed (%s); recording it offline: `wandb sync` uploads it later",
                    first_line(e))
        run = wandb.init(**args, mode="offline")
    keys = [f.name for f in dataclasses.fields(ReportRow) if f.name != "error"]
    table = wandb.Table(columns=keys, data=[[r.cells()[k] for k in keys] for r in rows])
    run.log({"mesh_sweep": table, **{f"plots/{n}": wandb.Image(str(sweep_dir / p)) for n, p in plots.items()}})
    best, reason = pick(rows)
    run.summary.update({"pick": best.mesh if best else None, "pick_reason": reason})
    run_dir = str(Path(run.dir).parent)
    run.finish()
    return run_dir


def write_report(sweep_dir: Path, use_wandb: bool = True) -> Path:
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no job dir with a summary.json under {sweep_dir}")
    rows = [row_of(j) for j in jobs]
    plots = make_plots(jobs, rows, sweep_dir / "plots")
    report = sweep_dir / "report.md"
    report.write_text(render(sweep_dir, jobs, rows, plots))
    best, _ = pick(rows)
    (sweep_dir / "report.json").write_text(json.dumps({"rows": [r.cells() for r in rows],
                                                       "pick": best.mesh if best else None}, indent=2))
    if use_wandb:
        try:
            log_wandb(sweep_dir, jobs, rows, plots)
        except Exception as e:  # noqa: BLE001 - the report on disk stands without W&B
            log.warning("W&B report logging failed: %s", e)
    return report


class SweepReport(Callback):
    """Hydra callback: after `python run.py -m ...`, write the sweep's report into the sweep dir."""

    def __init__(self) -> None:
        self.sweep_dirs: set[Path] = set()

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        if job_return.hydra_cfg is not None:
            self.sweep_dirs.add(Path(job_return.hydra_cfg.hydra.runtime.output_dir).parent)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        for sweep_dir in self.sweep_dirs:
            try:
                print(f"sweep report: {write_report(sweep_dir)}")
            except Exception as e:  # noqa: BLE001 - a report failure must not fail the finished sweep
                log.warning("sweep report for %s failed: %s", sweep_dir, e)
