"""Resuming through run.py (Hydra -> Ray -> gloo workers) with checkpoints on object storage (a real S3 API,
moto_server on 127.0.0.1; the runs are conftest's `resumes`): a tp2_dp2 run that checkpoints on S3 and loses a
worker resumes from S3 to the straight run's loss; same-name reruns and run.resume_from runs with another
global batch size and mesh, past a corrupt latest checkpoint, end at the straight run's sample on its LR
curve."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, read_run

pytestmark = pytest.mark.slow

# SMALL is epoch-bound: 50 samples make 6 global batches of 8, so the straight run ends after 48; a checkpoint
# every 2 steps of 8 = every 16 samples. 48 is a multiple of 16 and of 4, so every batch size below ends
# exactly there (an epoch's partial last batch would otherwise make it one batch early or late).
END = 48
LATEST = "checkpoint_0000004"


def test_a_tp2_dp2_run_on_s3_is_killed_and_resumes_to_the_straight_runs_loss(resumes, straight_2d, tmp_path):
    s3, fs = resumes["s3"], resumes["fs"]
    _, straight_rows = read_run(straight_2d)
    summary, rows = read_run(resumes["again"])
    assert summary["status"] == "completed" and summary["restarts"] == 1
    # Killed at step 5 after committing steps 2 and 4 on S3; the restart resumed from step 4 there.
    assert summary["resumed_from"] == s3.uri(f"ray/again/{LATEST}")
    assert summary["checkpoint"] == s3.uri("ray/again/checkpoint_0000006")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 1-4 before the fault, 5-6 after the restart
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]  # bit for bit
    # Every file of the checkpoint is on S3, committed last; nothing landed on a local "s3:" path.
    files = {p.rsplit("checkpoint_0000006/", 1)[-1] for p in fs.find(f"{s3.bucket}/ray/again/checkpoint_0000006")}
    assert {".metadata", "commit.json", "train_state.json", "hf/config.json"} | \
        {f"__{r}_0.distcp" for r in range(4)} <= files
    assert not list(ROOT.glob("s3:*")) and not list(resumes["root"].rglob("s3:*"))
    # scripts/export_hf.py reads it from S3.
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    proc = subprocess.run([sys.executable, "scripts/export_hf.py", summary["checkpoint"], str(tmp_path / "hf")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **s3.env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 4


def _lr_by_samples(rows: list[dict]) -> dict[int, float]:
    return {r["samples_consumed"]: r["lr"] for r in rows}


# The jobs of conftest's `resumes` sweep: same-name reruns of the crash, and run.resume_from runs from it.
BATCH_JOBS = {"0": ("rerun", 16), "1": ("resumed", 16), "2": ("rerun", 4), "3": ("resumed", 4)}


@pytest.mark.parametrize("job", list(BATCH_JOBS))
def test_another_global_batch_ends_at_the_straight_runs_sample_on_its_lr_curve(resumes, straight, job):
    run, batch = BATCH_JOBS[job]
    straight, straight_rows = read_run(straight)
    summary, rows = read_run(resumes["root"] / "batches" / job)
    assert straight["status"] == summary["status"] == "completed" and summary["global_batch_size"] == batch
    assert straight["samples_consumed"] == summary["samples_consumed"] == END
    assert summary["final_lr"] == pytest.approx(straight["final_lr"], rel=1e-12)
    assert straight["final_lr"] == pytest.approx(1e-4)  # run=debug: 1e-3 decayed to min_lr_ratio 0.1
    if run.startswith("rerun"):  # continues the run: the same LR at every sample both logged
        straight_lr, lr = _lr_by_samples(straight_rows), _lr_by_samples(rows)
        shared = sorted(straight_lr.keys() & lr.keys())
        assert len(shared) >= 2
        for samples in shared:
            assert lr[samples] == pytest.approx(straight_lr[samples], rel=1e-12), samples
    start = 16 if run.startswith("rerun") else 32  # reruns fell back from step 4 (32 samples) to step 2
    assert summary["resumed_from_step"] == start // 8
    # A rerun logs at the first start's marks (run.log_interval=1 at batch 8: every 8 samples), rounded to
    # its steps; a run.resume_from run at its own (every step).
    every = max(batch, 8) if run.startswith("rerun") else batch
    assert [r["samples_consumed"] for r in rows] == list(range(start + every, END + 1, every))
    assert rows[-1]["step"] == start // 8 + (END - start) // batch


@pytest.mark.parametrize("name, batch", [("batch_0", 16), ("batch_2", 4)])
def test_a_same_name_rerun_checkpoints_at_the_first_starts_sample_marks(resumes, name, batch):
    """run.checkpoint_every=2 was fixed at 16 samples by the batch-8 start; the rerun keeps the marks."""
    states = [json.loads(p.read_text())
              for p in sorted((resumes["root"] / "ray" / name).glob("checkpoint_0*/train_state.json"))]
    assert [s["samples_consumed"] for s in states if s["global_batch_size"] == batch] == [32, 48]
    assert all(s["schedule"]["checkpoint_every_samples"] == 16 for s in states)


def test_a_corrupt_latest_checkpoint_is_skipped_with_one_warning(resumes):
    # batch_2's train_state.json altered: the driver's checksum of the small files finds it, one console line.
    [line] = [x for x in resumes["batches_stderr"].splitlines() if "skipping checkpoint" in x]
    assert f"batch_2/{LATEST} is corrupt: train_state.json does not match its committed checksum" in line
    # batch_0's flipped shard byte: the driver passes it (sizes match), the rank's checksum does not; it says so
    # once in its log and falls back.
    log = (resumes["root"] / "batches" / "0" / "logs" / "rank0.log").read_text()
    [line] = [x for x in log.splitlines() if "skipping checkpoint" in x]
    assert f"{LATEST} is corrupt: __1_0.distcp does not match its committed checksum" in line
    assert "resumed from" in log and "batch_0/checkpoint_0000002" in log


def test_resume_from_reports_the_settings_it_changes(resumes):
    """The batch size and mesh are no fixed settings; nothing else changed, so nothing is reported."""
    assert "run.resume_from:" not in resumes["batches_stderr"]
