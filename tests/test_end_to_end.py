"""run.py end to end: Hydra -> Ray Train (real workers, gloo) -> W&B offline, on the tiny model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import (SECRETS, GiB, MB, ROOT, SMALL, files_holding, num, read_run, report_rows, run_py,
                            summaries, wandb_history, wandb_summary)

pytestmark = pytest.mark.slow


def test_default_run_trains_through_ray_and_logs_to_wandb(default_run):
    """`make run` (python run.py) with every default but the step count: 12 of its 40 steps."""
    run_dir, proc, _ = default_run
    summary, rows = read_run(run_dir)
    assert summary["status"] == "completed"
    assert summary["mesh"] == {"tp": 2, "dp": 2} and summary["world_size"] == 4
    assert summary["steps"] == 12 and summary["global_batch_size"] == 4
    assert summary["final_loss"] < 0.8 * summary["first_loss"]  # it visibly learns
    assert "done: 12 steps" in proc.stdout
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "epoch"):
        assert key in rows[-1]
    # Every log_interval, plus the instrumented steps 2-4 (comm counted, then profiled: tp2d_exp.perf.measure).
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 10, 12]
    assert rows[1]["comm/matches_prediction"] is True and summary["comm"]["matches_prediction"] is True
    # Every rank's peak RSS within 25 % of the plan's (process baseline + model states + the peak phase's
    # tensors: tp2d_exp.perf.analysis.predict_memory; scripts/bench_plan_cpu.py runs the 0.5B cases). RSS
    # counts the libraries' file pages a process maps, which depend on the page cache (the kernel maps
    # cached neighbours of each faulted page): `import torch` alone is 218 MB in a long-used venv and 274 MB
    # right after a fresh install, and this run's ranks 0.75 vs 0.89 GiB.
    memory = summary["memory"]
    for peak in memory["peak_bytes_per_rank"]:
        assert peak == pytest.approx(memory["predicted"]["total"], rel=0.25)
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / ".metadata").exists() and len(list(ckpt.glob("*.distcp"))) == 4
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 12
    # The offline W&B run holds the same loss history as metrics.jsonl.
    history = wandb_history(summary["wandb_dir"])
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    # The HF config and tokenizer the run used, rebuilt by any tool.
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(summary["model_dir"]).num_key_value_heads == 4
    assert len(AutoTokenizer.from_pretrained(summary["tokenizer_dir"])) == 8192


def test_default_run_evaluates_its_held_out_split(default_run):
    """data.val_fraction=0.01 and run.eval_every=10 by default: the held-out loss at step 10 and at the end,
    falling, in metrics.jsonl, W&B's val/ section and summary.json, and returned as the objective."""
    run_dir, proc, _ = default_run
    summary, rows = read_run(run_dir)
    evaluated = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [10, 12]
    assert evaluated[1]["val_loss"] < evaluated[0]["val_loss"] < summary["first_loss"]  # the untrained model's
    assert all(r["val_tokens"] == 32 * 127 and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
               for r in evaluated)
    assert summary["final_val_loss"] == summary["best_val_loss"] == evaluated[1]["val_loss"]
    assert summary["best_val_step"] == 12
    assert f"val loss {summary['final_val_loss']:.4f}" in proc.stdout
    history = {h["step"]: h for h in wandb_history(summary["wandb_dir"])}
    assert history[10]["val/loss"] == pytest.approx(evaluated[0]["val_loss"], rel=1e-6)
    assert "val/loss" not in history[5]


def test_evaluate_py_reproduces_the_runs_val_loss_on_another_mesh(default_run, tmp_path):
    """scripts/evaluate.py loads the tp2_dp2 run's final checkpoint on tp1_dp4 through the normal launcher and
    scores the same held-out samples: the run's final_val_loss to 1e-5."""
    summary, _ = read_run(default_run[0])
    proc = subprocess.run([sys.executable, "scripts/evaluate.py", summary["checkpoint"], "parallelism=tp1_dp4",
                           "--out", str(tmp_path / "eval")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["mesh"] == {"tp": 1, "dp": 4} and report["step"] == 12 and report["val_samples"] == 32
    assert report["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert f"held-out loss {report['val_loss']:.6f}" in proc.stdout
    assert not list((tmp_path / "eval").glob("metrics.jsonl"))  # nothing trained


@pytest.fixture(scope="module")
def default_export(default_run, tmp_path_factory) -> Path:
    """scripts/export_hf.py's HF dir of the default run's final checkpoint."""
    summary, _ = read_run(default_run[0])
    out = tmp_path_factory.mktemp("export") / "hf"
    subprocess.run([sys.executable, "scripts/export_hf.py", summary["checkpoint"], str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    return out


def test_generate_py_continues_a_prompt_from_the_default_runs_checkpoint_and_its_export(default_run, default_export):
    """Greedy text from the checkpoint (generate.py exports it first, as export_hf.py does) and from the
    exported dir: the same continuation of the prompt. Both at once: each is mostly interpreter start-up."""
    summary, _ = read_run(default_run[0])
    prompt = "The river"
    procs = [subprocess.Popen([sys.executable, "scripts/generate.py", source, "--prompt", prompt, "--max-new-tokens",
                               "12", "--greedy"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for source in (summary["checkpoint"], str(default_export))]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    from_checkpoint, from_export = (out.rstrip("\n") for out, _ in outputs)
    assert from_checkpoint == from_export
    # A 12-step model's greedy text may be degenerate (repeated commas): what matters is that it continues.
    assert from_checkpoint.startswith(prompt) and from_checkpoint[len(prompt):].strip()


def test_the_exported_model_scores_the_checkpoints_val_loss_with_plain_transformers(default_run, default_export,
                                                                                   tmp_path):
    """scripts/export_hf.py's dir, loaded by AutoModelForCausalLM alone and scored on the same held-out
    samples (the first run.eval_samples of the held-out store): the run's final val loss to 1e-5, so the
    export is the trained model, not only a loadable one."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import compose_job
    from tp2d_exp.data.dataset import Split, open_samples

    summary, _ = read_run(default_run[0])
    job = compose_job(tmp_path, [])  # the default run's data: the same held-out store
    heldout = open_samples(job, Split.heldout)
    ids = heldout.input_ids[:job.run.eval_samples].long()
    model = AutoModelForCausalLM.from_pretrained(default_export).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten())
    assert float(loss) == pytest.approx(summary["final_val_loss"], rel=1e-5)


def test_credentials_stay_out_of_every_file_a_local_run_leaves(default_run):
    """HF_TOKEN and WANDB_API_KEY reach the workers of a local Ray (started by the driver, it inherits the
    driver's environment) without Ray's runtime env, which Ray writes into its session logs: neither value is
    in any file of the run dir, the local Ray's session dirs, the run's Ray storage or its W&B dir."""
    run_dir, proc, ray_tmp = default_run
    summary, _ = read_run(run_dir)
    assert not any(v in proc.stdout + proc.stderr for v in SECRETS.values())
    # ...yet the workers have them (a worker logs their names).
    assert "credentials: HF_TOKEN, WANDB_API_KEY" in (run_dir / "logs" / "rank0.log").read_text()
    assert list((ray_tmp / "ray").glob("session_*/logs/runtime_env_agent.log"))  # the logs that held them
    roots = [run_dir, ray_tmp, Path(summary["wandb_dir"]), Path(summary["checkpoint"]).parent]
    leaks = files_holding(roots, list(SECRETS.values()))
    assert not leaks, "\n".join(leaks)


def test_a_lost_worker_beyond_max_failures_fails_the_run_in_one_line(resumes):
    first, rows = read_run(resumes["crashed"])
    assert first["status"] == "failed" and first["failure"] == "worker_fault"
    assert first["error"] == ("ActorDiedError: worker rank 1 was lost (its process died or stopped answering) "
                              "(gave up after 0 restart(s): run.max_failures=0)")
    assert f"error: {first['error']}" in resumes["crashed_stderr"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert resumes["kept"] == ["checkpoint_0000002", "checkpoint_0000004"]


def test_a_restarted_worker_group_ends_where_a_straight_run_ends(straight_2d, resumes, monkeypatch):
    """The run (tp2_dp2, checkpoints on S3) loses a worker at step 5, is restarted by Ray from its step-4
    checkpoint and ends with exactly the straight run's loss and parameters."""
    from tp2d_exp.checkpoint.manager import load_model_state

    summary, rows = read_run(resumes["again"])
    reference, straight_rows = read_run(straight_2d)
    assert summary["status"] == "completed" and summary["restarts"] == 1 and summary["resumed_from_step"] == 4
    [restart] = summary["restart_history"]
    assert restart["resumed_from_step"] == 4 and restart["checkpoint"].endswith("/again/checkpoint_0000004")
    assert restart["fault"]["step"] == 5 and restart["fault"]["rank"] == 1 and restart["restart_s"] > 0
    # The first attempt trained steps 1-4 and died on its way to step 5; the restart trained 5 and 6.
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]
    assert summary["final_loss"] == reference["final_loss"]
    for k, v in resumes["s3"].env.items():
        monkeypatch.setenv(k, v)
    resumed, expected = load_model_state(summary["checkpoint"]), load_model_state(reference["checkpoint"])
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    # W&B: the restarted attempt resumed the same W&B run, marked the restart and logged steps 5-6.
    assert wandb_summary(summary["wandb_dir"])["restarts"] == 1
    assert wandb_summary(summary["wandb_dir"])["resumed_from_step"] == 4
    assert [h["step"] for h in wandb_history(summary["wandb_dir"])] == [5, 6]


def test_resume_on_another_mesh_past_a_truncated_checkpoint_until_a_nan(straight, resumes, tmp_path):
    """run.resume_from names a local copy of the crashed run's dir, whose latest checkpoint (step 4) is
    truncated: the job reports it in one line and resumes the previous one (written by 4 ranks, tp2_dp2) on
    1 rank; steps 3 and 4 match the straight run; a NaN injected at step 5 stops the run as failed, naming
    the step, with step 4's checkpoint intact."""
    from tp2d_exp.checkpoint.store import verify

    source = tmp_path / "ray" / "source"
    shutil.copytree(resumes["base_copy"], source)
    shard = source / "checkpoint_0000004" / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    proc = run_py("parallelism=tp1_dp1", *SMALL, "logger=none", f"run.resume_from={source}",
                  "run.checkpoint_every=1", "run.fault.nan_at_step=5", f"hydra.run.dir={tmp_path / 'run'}",
                  f"cluster.storage_path={tmp_path / 'ray'}", returncode=1)
    assert f"__0_0.distcp has {size - 100} of its {size} bytes" in proc.stderr
    summary, rows = read_run(tmp_path / "run")
    _, straight_rows = read_run(straight)
    assert summary["resumed_from_step"] == 2 and Path(summary["resumed_from"]).name == "checkpoint_0000002"
    assert [r["step"] for r in rows] == [3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in straight_rows[2:4]], rel=1e-5)
    assert summary["status"] == "failed"
    assert summary["error"].startswith("NonFiniteError: non-finite loss nan / grad norm nan at step 5")
    assert f"error: {summary['error']}" in proc.stderr
    assert Path(summary["checkpoint"]).name == "checkpoint_0000004"
    verify(summary["checkpoint"])
    assert json.loads((Path(summary["checkpoint"]) / "train_state.json").read_text())["step"] == 4


def test_cpu_mesh_sweep_measures_predicts_and_reports(sweep):
    """`run.py -m` over tp1_dp2 and tp2_dp2 on the same global batches through Ray: one job per mesh; the
    report's rows are the jobs' summaries; each job's collectives equal the prediction and its state memory
    is within 5 %."""
    jobs = summaries(sweep)
    assert list(jobs) == ["tp1_dp2", "tp2_dp2"]
    # One job per mesh, each with its own run dir and its own Ray run: no job resumes another's checkpoints.
    assert len({s["run_name"] for s in jobs.values()}) == 2
    for s in jobs.values():
        assert Path(s["checkpoint"]).parent.name == s["run_name"]
    losses = {}
    for mesh, s in jobs.items():
        assert s["status"] == "completed" and s["steps"] == 6
        assert s["comm"]["matches_prediction"] and s["comm"]["measured"] == s["comm"]["predicted"]
        mem = s["memory"]
        assert len(mem["peak_bytes_per_rank"]) == s["world_size"] and mem["peak_bytes"] == max(mem["peak_bytes_per_rank"])
        p = mem["predicted"]
        for state in mem["state_bytes_per_rank"]:
            assert sum(state.values()) == pytest.approx(p["params"] + p["grads"] + p["optimizer"], rel=0.05)
        rows = [json.loads(x) for x in (sweep / str(list(jobs).index(mesh)) / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("instrumented", False) for r in rows] == [False, True, True, False, False, False]
        assert rows[1]["comm/tp_bytes"] == s["comm"]["measured_bytes"]["tp"]["bytes"]
        # Throughput leaves out the first step and the instrumented ones.
        assert s["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in rows[3:]) / 3)
        losses[mesh] = [r["loss"] for r in rows]
    # Same global batches: the mesh changes speed, not the math.
    assert losses["tp2_dp2"] == pytest.approx(losses["tp1_dp2"], rel=1e-5)
    assert jobs["tp1_dp2"]["comm"]["measured_bytes"]["tp"]["bytes"] == 0
    assert jobs["tp2_dp2"]["comm"]["measured_bytes"]["tp"]["bytes"] > 0
    # FSDP over dp either way; with tp2 each rank's dp shard is half the size.
    assert 0 < jobs["tp2_dp2"]["comm"]["measured_bytes"]["dp"]["bytes"] < jobs["tp1_dp2"]["comm"]["measured_bytes"]["dp"]["bytes"]

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
