"""run.py end to end: Hydra -> Ray Train (real workers, gloo) -> W&B offline, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def run_py(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}  # tests never reach a W&B server
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def wandb_history(wandb_dir: str) -> list[dict]:
    """The history rows of an offline W&B run, read back from its binary .wandb file."""
    run_file = next(Path(wandb_dir).glob("run-*.wandb"))
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


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


def test_resume_from_checkpoint_equals_straight_run(sweep, tmp_path):
    """3 steps, then the same run name resumes from its checkpoint for 3 more: the same final loss and
    parameters as the sweep's straight 6-step tp1_dp2 run (same schedule: decay over 6 steps)."""
    root, _ = sweep
    common = ["parallelism=tp1_dp2", "run=debug", "logger=none", "run.name=resume_me", "run.lr_decay_steps=6",
              f"cluster.storage_path={tmp_path / 'ray'}"]
    run_py(*common, "run.max_steps=3", f"hydra.run.dir={tmp_path / 'first'}")
    run_py(*common, "run.max_steps=6", f"hydra.run.dir={tmp_path / 'second'}")
    first, _ = read_run(tmp_path / "first")
    second, rows = read_run(tmp_path / "second")
    straight, straight_rows = read_run(root / "0")
    assert first["steps"] == 3 and second["resumed_from_step"] == 3
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in straight_rows[3:]], rel=1e-6)
    resumed, reference = model_tensors(second["checkpoint"]), model_tensors(straight["checkpoint"])
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
