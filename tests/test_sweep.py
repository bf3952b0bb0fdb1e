"""Mesh sweeps through run.py -m with plan_only (seconds, no Ray), turned into report.md, plots and a W&B table
by the sweep report. The real CPU sweep through Ray is in test_end_to_end.py (it is also the reference run of
the fault tests there)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import MB, GiB, num, report_rows, run_py, summaries

# run.py subprocesses (a sweep of Hydra jobs each): seconds, not a Ray start, but too many for the fast tier.
pytestmark = pytest.mark.slow


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
    assert table["columns"][table["columns"].index("final_loss") + 1] == "val_loss"  # plans: null


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "plan"
    run_py("-m", "parallelism=tp8_dp1,tp4_dp2", "model=qwen2_7b", "run.plan_only=true", "logger=none",
           f"hydra.sweep.dir={sweep}")
    first, second = (json.loads((sweep / j / "summary.json").read_text()) for j in "01")
    assert first["status"] == "failed" and first["mesh"] == {"tp": 8, "dp": 1}
    assert second["status"] == "planned" and second["mesh"] == {"tp": 4, "dp": 2}
    assert "**Pick: tp4_dp2**" in (sweep / "report.md").read_text()
