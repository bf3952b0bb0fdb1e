"""run.py end to end: Hydra -> Ray Train (real workers, gloo) -> W&B offline, on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def run_py(*args: str, timeout: float = 400, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}  # tests never reach a W&B server
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def wandb_records(wandb_dir: str) -> list[dict]:
    """The records of an offline W&B run, read back from its binary .wandb file."""
    run_file = next(Path(wandb_dir).glob("run-*.wandb"))
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def wandb_history(wandb_dir: str) -> list[dict]:
    return [r["history"]["item"] for r in wandb_records(wandb_dir) if r.get("type") == "history"]


def wandb_summary(wandb_dir: str) -> dict:
    summary: dict = {}
    for r in wandb_records(wandb_dir):
        if r.get("type") == "summary":
            summary.update(r["summary"].get("update", {}))
    return summary


def model_tensors(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(checkpoint_dir).parent / (Path(checkpoint_dir).name + ".pt")
    dcp_to_torch_save(checkpoint_dir, out)
    return torch.load(out, weights_only=False)["model"]


def test_default_run_trains_through_ray_and_logs_to_wandb(tmp_path):
    run_dir = tmp_path / "default"
    proc = run_py(f"hydra.run.dir={run_dir}")
    summary, rows = read_run(run_dir)
    assert summary["status"] == "completed"
    assert summary["mesh"] == {"tp": 2, "dp": 2} and summary["world_size"] == 4
    assert summary["steps"] == 40 and summary["global_batch_size"] == 4
    assert summary["final_loss"] < 0.8 * summary["first_loss"]  # it visibly learns
    assert "done: 40 steps" in proc.stdout
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "epoch"):
        assert key in rows[-1]
    # Every log_interval, plus the instrumented steps 2-4 (comm counted, then profiled: tp2d_exp.measure).
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 10, 15, 20, 25, 30, 35, 40]
    assert rows[1]["comm/matches_prediction"] is True and summary["comm"]["matches_prediction"] is True
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / ".metadata").exists() and len(list(ckpt.glob("*.distcp"))) == 4
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 40
    # The offline W&B run holds the same loss history as metrics.jsonl.
    history = wandb_history(summary["wandb_dir"])
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    # The HF config and tokenizer the run used, rebuilt by any tool.
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(summary["model_dir"]).num_key_value_heads == 4
    assert len(AutoTokenizer.from_pretrained(summary["tokenizer_dir"])) == 8192


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    proc = run_py("-m", "parallelism=tp1_dp2,tp2_dp1", "run=debug", "logger=none", f"hydra.sweep.dir={root}",
                  f"cluster.storage_path={root / 'ray'}")
    return root, proc


def test_multirun_runs_every_mesh_with_its_own_outputs(sweep):
    root, _ = sweep
    meshes = []
    for job in ("0", "1"):
        summary, rows = read_run(root / job)
        assert summary["status"] == "completed" and summary["steps"] == 6
        meshes.append(summary["mesh"])
        assert Path(summary["checkpoint"]).parent.name == summary["run_name"]  # its own Ray run
    assert meshes == [{"tp": 1, "dp": 2}, {"tp": 2, "dp": 1}]
    assert len({json.loads((root / j / "summary.json").read_text())["run_name"] for j in "01"}) == 2


def test_crashed_job_resumes_by_name_to_the_straight_runs_result(sweep, tmp_path):
    """A job loses a worker process at step 5 with no restart allowed (run.max_failures=0): it fails with a
    clear error and keeps its step-3 checkpoint. Rerunning the same run name resumes there and ends with the same loss and
    parameters as the sweep's straight 6-step tp1_dp2 run."""
    root, _ = sweep
    common = ["parallelism=tp1_dp2", "run=debug", "logger=none", "run.name=resume_me", "run.checkpoint_every=3",
              f"cluster.storage_path={tmp_path / 'ray'}"]
    proc = run_py(*common, "run.fault.fail_at_step=5", "run.fault.rank=1", "run.fault.mode=exit",
                  f"hydra.run.dir={tmp_path / 'first'}", returncode=1)
    first, first_rows = read_run(tmp_path / "first")
    assert first["status"] == "failed" and first["restarts"] == 0
    # The dead rank is named, not rank 0's broken collective that follows from it.
    assert first["error"] == ("ActorDiedError: worker rank 1 was lost (its process died or stopped answering) "
                              "(gave up after 0 restart(s): run.max_failures=0)")
    assert f"error: {first['error']}" in proc.stderr
    assert [r["step"] for r in first_rows] == [1, 2, 3, 4]
    run_py(*common, f"hydra.run.dir={tmp_path / 'second'}")
    second, rows = read_run(tmp_path / "second")
    straight, straight_rows = read_run(root / "0")
    assert second["resumed_from_step"] == 3 and second["restarts"] == 0
    assert Path(second["resumed_from"]).name == "checkpoint_0000003"
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in straight_rows[3:]], rel=1e-6)
    resumed, reference = model_tensors(second["checkpoint"]), model_tensors(straight["checkpoint"])
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    """The sweep's tp1_dp2 job (6 steps) checkpointing every 3 steps, with W&B (offline) and rank 1's process
    killed when it reaches step 5; Ray restarts the worker group (run.max_failures=1)."""
    root = tmp_path_factory.mktemp("faulted")
    run_py("parallelism=tp1_dp2", "run=debug", "run.checkpoint_every=3", "run.num_to_keep=2", "run.max_failures=1",
           "run.fault.fail_at_step=5", "run.fault.rank=1", "run.fault.mode=exit", "logger.mode=offline",
           f"hydra.run.dir={root / 'run'}", f"cluster.storage_path={root / 'ray'}")
    return root


def test_worker_fault_restarts_and_ends_where_a_straight_run_ends(sweep, faulted):
    summary, rows = read_run(faulted / "run")
    straight, straight_rows = read_run(sweep[0] / "0")
    assert summary["status"] == "completed" and summary["restarts"] == 1 and summary["resumed_from_step"] == 3
    [restart] = summary["restart_history"]
    assert restart["resumed_from_step"] == 3 and Path(restart["checkpoint"]).name == "checkpoint_0000003"
    assert restart["fault"]["step"] == 5 and restart["fault"]["rank"] == 1 and restart["restart_s"] > 0
    # The first attempt logged steps 1-4 and died on its way to step 5; the restart redid step 4, exactly.
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4, 5, 6]
    assert rows[3]["loss"] == rows[4]["loss"]
    assert summary["final_loss"] == straight["final_loss"]
    resumed, reference = model_tensors(summary["checkpoint"]), model_tensors(straight["checkpoint"])
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    # W&B: the restarted attempt resumed the same W&B run, marked the restart and logged steps 4-6.
    assert wandb_summary(summary["wandb_dir"])["restarts"] == 1
    assert wandb_summary(summary["wandb_dir"])["resumed_from_step"] == 3
    assert [h["step"] for h in wandb_history(summary["wandb_dir"])] == [4, 5, 6]


def test_resume_on_another_mesh_past_a_truncated_checkpoint_until_a_nan(sweep, faulted, tmp_path):
    """run.resume_from names the faulted run's dir, whose latest checkpoint is truncated: the job reports it in
    one line and resumes the previous one (written by 2 ranks, tp1_dp2) on 1 rank; step 4 matches the straight
    run; a NaN injected at step 5 stops the run as failed, naming the step, with step 4's checkpoint intact."""
    from tp2d_exp.checkpoint import verify

    source = tmp_path / "ray" / "source"
    shutil.copytree(Path(read_run(faulted / "run")[0]["checkpoint"]).parent, source)
    shard = source / "checkpoint_0000006" / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    proc = run_py("parallelism=tp1_dp1", "run=debug", "run.global_batch_size=4", "logger=none",
                  f"run.resume_from={source}",
                  "run.checkpoint_every=1", "run.fault.nan_at_step=5", f"hydra.run.dir={tmp_path / 'run'}",
                  f"cluster.storage_path={tmp_path / 'ray'}", returncode=1)
    assert f"__0_0.distcp has {size - 100} of its {size} bytes" in proc.stderr
    summary, rows = read_run(tmp_path / "run")
    _, straight_rows = read_run(sweep[0] / "0")
    assert summary["resumed_from_step"] == 3 and Path(summary["resumed_from"]).name == "checkpoint_0000003"
    assert [r["step"] for r in rows] == [4]
    assert rows[0]["loss"] == pytest.approx(straight_rows[3]["loss"], rel=1e-5)  # another mesh: fp32 tolerance
    assert summary["status"] == "failed"
    assert summary["error"].startswith("NonFiniteError: non-finite loss nan / grad norm nan at step 5")
    assert f"error: {summary['error']}" in proc.stderr
    assert Path(summary["checkpoint"]).name == "checkpoint_0000004"
    verify(summary["checkpoint"])
    assert json.loads((Path(summary["checkpoint"]) / "train_state.json").read_text())["step"] == 4
