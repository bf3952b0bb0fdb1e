"""The sweep report from job dirs written by hand (summary.json and metrics.jsonl through tp2d_exp.records):
no Ray, no run.py, a second or two. The real sweeps that write those dirs are in test_sweep.py and
test_end_to_end.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tests.conftest import report_rows
from tp2d_exp.perf.report import write_report
from tp2d_exp.records import Mesh, RunStatus, RunSummary, StepRow, write_json


def write_job(job_dir: Path, tp: int, dp: int, losses: list[float], val: dict[int, float]) -> None:
    """A completed job of len(losses) steps, held-out losses at the steps `val` names (none: no held-out split)."""
    job_dir.mkdir(parents=True)
    rows = [StepRow(step=step, epoch=0, loss=loss, lr=1e-3, grad_norm=1.0, samples_consumed=8 * step,
                    skipped_steps=0, tokens_per_s=1000.0, useful_tokens_per_s=900.0,
                    tokens_per_s_per_device=1000.0 / (tp * dp), step_time_s=0.5, val_loss=val.get(step))
            for step, loss in enumerate(losses, start=1)]
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(r.flat()) + "\n" for r in rows))
    last_val: Optional[int] = max(val, default=None)
    write_json(job_dir / "summary.json", RunSummary(
        status=RunStatus.completed, run_name=f"r{job_dir.name}", mesh=Mesh(tp=tp, dp=dp), world_size=tp * dp,
        global_batch_size=8, steps=len(losses), first_loss=losses[0], final_loss=losses[-1], tokens_per_s=1000.0,
        tokens_per_s_per_device=1000.0 / (tp * dp), step_time_s=0.5,
        final_val_loss=val[last_val] if val else None, best_val_loss=min(val.values(), default=None),
        best_val_step=min(val, key=val.get) if val else None))


def test_report_has_a_val_loss_column_and_plot(tmp_path):
    sweep = tmp_path / "sweep"
    write_job(sweep / "0", 1, 2, [8.0, 7.5, 7.0, 6.5], {2: 7.25, 4: 6.75})
    write_job(sweep / "1", 2, 1, [8.0, 7.5, 7.0, 6.5], {2: 7.2501, 4: 6.7501})
    report = write_report(sweep, use_wandb=False)

    rows = report_rows(report)
    assert [rows[m]["val loss"] for m in ("tp1_dp2", "tp2_dp1")] == ["6.7500", "6.7501"]
    assert rows["tp1_dp2"]["final loss"] == "6.5000"  # the columns around it are unchanged
    plot = sweep / "plots" / "val_loss.png"
    assert plot.stat().st_size > 0 and "![val_loss](plots/val_loss.png)" in report.read_text()
    # report.json holds the same cells as the W&B table (both are ReportRow.cells()).
    assert [r["val_loss"] for r in json.loads((sweep / "report.json").read_text())["rows"]] == [6.75, 6.7501]


def test_without_held_out_rows_no_val_loss_plot_and_a_dash(tmp_path):
    sweep = tmp_path / "sweep"
    write_job(sweep / "0", 1, 2, [8.0, 7.0], {})
    write_job(sweep / "1", 2, 1, [8.0, 7.0], {})
    report = write_report(sweep, use_wandb=False)

    assert {r["val loss"] for r in report_rows(report).values()} == {"—"}
    assert not (sweep / "plots" / "val_loss.png").exists() and "val_loss" not in report.read_text()
    assert (sweep / "plots" / "loss.png").stat().st_size > 0
    assert all(r["val_loss"] is None for r in json.loads((sweep / "report.json").read_text())["rows"])
