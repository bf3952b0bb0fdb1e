"""Mesh sweeps end to end through run.py -m: plan_only over meshes (seconds, no Ray) and a real 3-mesh CPU
sweep of the tiny model (slow), each turned into report.md, plots and a W&B table by the sweep report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

GiB, MB = 2**30, 1e6


def run_py(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}  # tests never reach a W&B server
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def summaries(sweep: Path) -> dict[str, dict]:
    out = {}
    for job in sorted(sweep.iterdir()):
        if (job / "summary.json").exists():
            s = json.loads((job / "summary.json").read_text())
            out[f"tp{s['mesh']['tp']}_dp{s['mesh']['dp']}"] = s
    return out


def report_rows(report: Path) -> dict[str, dict[str, str]]:
    """The markdown table of report.md, by mesh."""
    lines = [x for x in report.read_text().splitlines() if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in x.strip("|").split("|")))) for x in lines[2:]]
    return {r["mesh"]: r for r in rows}


def num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_plan_only_sweep_of_qwen2_7b_over_8_gpus(tmp_path):
    """No GPU, no download, no Ray: every 8-GPU mesh of Qwen2-7B planned and reported; tp8 cannot split its
    28 heads, fails validation and is recorded as failed."""
    sweep = tmp_path / "plan"
    proc = run_py("-m", "+experiment=mesh_sweep_8", "model=qwen2_7b", "run.plan_only=true",
                  f"hydra.sweep.dir={sweep}", f"cluster.storage_path={tmp_path / 'ray'}")
    assert not (tmp_path / "ray").exists()  # Ray never started
    jobs = summaries(sweep)
    assert [s["status"] for s in jobs.values()] == ["planned", "planned", "planned", "failed"]
    assert "num_attention_heads=28" in jobs["tp8_dp1"]["error"]
    assert proc.stdout.count("plan: qwen2_7b (7.62B params)") == 3 and "fits" in proc.stdout

    rows = report_rows(sweep / "report.md")
    for mesh in ("tp1_dp8", "tp2_dp4", "tp4_dp2"):
        s, r = jobs[mesh], rows[mesh]
        assert num(r["tokens/s"]) == pytest.approx(s["plan"]["tokens_per_s"], abs=0.5)
        assert num(r["TP MB/step"]) == pytest.approx(s["comm"]["predicted_bytes"]["tp"]["bytes"] / MB, abs=0.005)
        assert num(r["DP MB/step"]) == pytest.approx(s["comm"]["predicted_bytes"]["dp"]["bytes"] / MB, abs=0.005)
        assert num(r["peak mem/rank (GiB)"]) == pytest.approx(s["memory"]["predicted"]["total"] / GiB, abs=5e-4)
        assert r["status"] == "planned" and r["final loss"] == "—"
    assert rows["tp8_dp1"]["status"] == "failed"
    best = max(("tp1_dp8", "tp2_dp4", "tp4_dp2"), key=lambda m: jobs[m]["plan"]["tokens_per_s"])
    assert f"**Pick: {best}**" in (sweep / "report.md").read_text()
    assert all((sweep / "plots" / f"{p}.png").stat().st_size > 0 for p in ("throughput", "comm_bytes", "memory"))

    # The same table in the sweep's W&B group (offline run inside the sweep dir).
    table_file = next(sweep.glob("wandb/offline-run-*/files/media/table/mesh_sweep_*.table.json"))
    table = json.loads(table_file.read_text())
    mesh_col = table["columns"].index("mesh")
    assert [row[mesh_col] for row in table["data"]] == list(jobs)


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "plan"
    run_py("-m", "parallelism=tp8_dp1,tp4_dp2", "model=qwen2_7b", "run.plan_only=true", "logger=none",
           f"hydra.sweep.dir={sweep}")
    first, second = (json.loads((sweep / j / "summary.json").read_text()) for j in "01")
    assert first["status"] == "failed" and first["mesh"] == {"tp": 8, "dp": 1}
    assert second["status"] == "planned" and second["mesh"] == {"tp": 4, "dp": 2}
    assert "**Pick: tp4_dp2**" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_cpu_mesh_sweep_measures_predicts_and_reports(tmp_path):
    """tp1_dp4, tp2_dp2, tp4_dp1 on the same global batches through Ray: the report's rows are the jobs'
    summaries; each job's collectives equal the prediction and its state memory is within 5 %."""
    sweep = tmp_path / "sweep"
    run_py("-m", "+experiment=mesh_sweep_4", "run=debug", "run.max_steps=4", "run.profile_steps=1",
           "run.batch_size_per_gpu=1", "run.global_batch_size=4", "data.seq_length=64", "logger=none",
           f"hydra.sweep.dir={sweep}", f"cluster.storage_path={tmp_path / 'ray'}")
    jobs = summaries(sweep)
    assert list(jobs) == ["tp1_dp4", "tp2_dp2", "tp4_dp1"]
    losses = {}
    for mesh, s in jobs.items():
        assert s["status"] == "completed" and s["steps"] == 4
        assert s["comm"]["matches_prediction"] and s["comm"]["measured"] == s["comm"]["predicted"]
        mem = s["memory"]
        assert len(mem["peak_bytes_per_rank"]) == 4 and mem["peak_bytes"] == max(mem["peak_bytes_per_rank"])
        p = mem["predicted"]
        for state in mem["state_bytes_per_rank"]:
            assert sum(state.values()) == pytest.approx(p["params"] + p["grads"] + p["optimizer"], rel=0.05)
        rows = [json.loads(x) for x in (sweep / str(list(jobs).index(mesh)) / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("instrumented", False) for r in rows] == [False, True, True, False]
        assert rows[1]["comm/tp_bytes"] == s["comm"]["measured_bytes"]["tp"]["bytes"]
        assert s["tokens_per_s"] == pytest.approx(rows[3]["tokens_per_s"])  # instrumented steps left out
        losses[mesh] = [r["loss"] for r in rows]
    for mesh in ("tp2_dp2", "tp4_dp1"):  # same global batches: the mesh changes speed, not the math
        assert losses[mesh] == pytest.approx(losses["tp1_dp4"], rel=1e-5)
    assert jobs["tp1_dp4"]["comm"]["measured_bytes"]["tp"]["bytes"] == 0
    assert jobs["tp4_dp1"]["comm"]["measured_bytes"]["dp"]["bytes"] == 8  # the two loss scalars only

    report = sweep / "report.md"
    rows = report_rows(report)
    for mesh, s in jobs.items():
        r = rows[mesh]
        assert r["status"] == "completed" and r["bytes = predicted"] == "exact"
        assert num(r["tokens/s"]) == pytest.approx(s["tokens_per_s"], abs=0.5)
        assert num(r["step time (s)"]) == pytest.approx(s["step_time_s"], abs=5e-5)
        assert num(r["TP MB/step"]) == pytest.approx(s["comm"]["measured_bytes"]["tp"]["bytes"] / MB, abs=0.005)
        assert num(r["DP MB/step"]) == pytest.approx(s["comm"]["measured_bytes"]["dp"]["bytes"] / MB, abs=0.005)
        assert num(r["comm share"]) == pytest.approx(100 * s["comm"]["profile"]["comm_share"], abs=0.05)
        assert num(r["peak mem/rank (GiB)"]) == pytest.approx(s["memory"]["peak_bytes"] / GiB, abs=5e-4)
        assert num(r["final loss"]) == pytest.approx(s["final_loss"], abs=5e-5)
        measured, predicted = (num(x) for x in r["state GiB meas / pred"].split("/"))
        assert measured == pytest.approx(predicted, rel=0.05)
        assert r["MFU"] == "—"  # no peak FLOPs on CPU
    assert all((sweep / "plots" / f"{p}.png").stat().st_size > 0
               for p in ("loss", "throughput", "comm_bytes", "memory"))
    # The script rebuilds the same report from the job dirs.
    first = report.read_text()
    subprocess.run([sys.executable, "scripts/sweep_report.py", str(sweep), "--no-wandb"], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    assert report.read_text() == first
