"""summary.json's content, assembled on the driver from what the launch saw, rank 0's metrics.jsonl and its
worker report (tp2d_exp.driver.job writes it, once per job)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Optional

from tp2d_exp.records import WORKER_FILE, RunStatus, RunSummary, StepRow, WorkerReport, read_json, read_rows


def _steady_mean(rows: list[StepRow], key: str) -> float:
    """Mean over logged windows after the first (which includes start-up and the first step), leaving out
    instrumented steps (comm counter, profiler: tp2d_exp.perf.measure)."""
    steady = [r for r in rows[1:] if not r.instrumented] or rows[1:] or rows
    return sum(getattr(r, key) for r in steady) / len(steady)


def add_metrics(summary: RunSummary, rows: list[StepRow]) -> None:
    if not rows:
        return
    summary.steps, summary.first_loss, summary.final_loss = rows[-1].step, rows[0].loss, rows[-1].loss
    summary.samples_consumed, summary.final_lr = rows[-1].samples_consumed, rows[-1].lr
    for key in ("tokens_per_s", "useful_tokens_per_s", "tokens_per_s_per_device", "step_time_s"):
        setattr(summary, key, _steady_mean(rows, key))
    if rows[-1].mfu is not None:  # GPUs listed in the hardware table only
        summary.mfu = _steady_mean(rows, "mfu")
    evaluated = [r for r in rows if r.val_loss is not None]
    if evaluated:
        best = min(evaluated, key=lambda r: r.val_loss)
        summary.final_val_loss, summary.best_val_loss, summary.best_val_step = \
            evaluated[-1].val_loss, best.val_loss, best.step


def add_worker_report(summary: RunSummary, report: Optional[WorkerReport]) -> None:
    """Merge rank 0's report; a failure the workers ended on by themselves (a non-finite stop) fails the run."""
    if report is None:
        return
    for f in fields(WorkerReport):
        if f.name not in ("failure", "error"):
            setattr(summary, f.name, getattr(report, f.name))
    if report.failure is not None:
        summary.status, summary.failure, summary.error = RunStatus.failed, report.failure, report.error


def collect(summary: RunSummary, run_dir: Path) -> None:
    """What the workers left in the run dir."""
    add_metrics(summary, read_rows(run_dir / "metrics.jsonl"))
    worker = run_dir / WORKER_FILE
    add_worker_report(summary, read_json(WorkerReport, worker) if worker.exists() else None)
