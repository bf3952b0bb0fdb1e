"""Checkpoints over real gloo process groups: resume on the same and on other meshes, fall back past a broken
latest checkpoint, refuse one that does not fit, export to Hugging Face, guard against non-finite steps."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.conftest import compose_job, run_distributed

N = 3  # checkpoint every N steps; the straight run trains 2N
GLOBAL_BATCH = 8
# Another mesh sums in another order: a few ulps per op, below 1e-5 relative over these steps (see
# test_parity.py for why parameters get an absolute bound in units of one Adam step).
RTOL = 1e-5
# Resuming on tp4_dp1 was measured to move a single embedding entry of 2,097,152 by 4.9e-5 (Adam on a
# near-zero gradient), so the bound here is 1e-4 = 10% of one lr step; a wrong shard moves whole rows by ~1e-2.
PARAM_ATOL = 1e-4


def mesh_job(root: Path, tp: int, dp: int, extra: list[str] = ()):
    return compose_job(root, [f"parallelism=tp{tp}_dp{dp}", f"run.global_batch_size={GLOBAL_BATCH}",
                              f"run.batch_size_per_gpu={GLOBAL_BATCH // dp}", "data.seq_length=64",
                              f"run.max_steps={2 * N}", *extra])


def _manager(job, j, run_dir: str):
    from tp2d_exp.checkpoint.manager import CheckpointManager

    return CheckpointManager(j.model, j.optimizer, j.scheduler, j.order, run_dir, j.model.config,
                             job.resolved.tokenizer_dir)


def _full_params(model) -> dict[str, torch.Tensor] | None:
    """Every parameter unsharded, on rank 0 (gathering is collective: every rank calls this)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}
    return full if dist.get_rank() == 0 else None


def _train(j, state, steps: int, on_step=None) -> list[float]:
    from tp2d_exp.train.loop import train_step

    losses = []
    for epoch, s in j.order.steps(state.epoch, state.step_in_epoch, 1):
        if state.step >= steps:
            break
        result = train_step(j, epoch, s)
        state.advance(j.order, epoch, s, result.tokens)
        losses.append(result.loss)
        if on_step:
            on_step(state)
    return losses


def scenario(jobs: dict, root: str) -> dict:
    """One set of 4 gloo ranks (process start-up dominates on CPU), one mesh after another:
    1. tp2_dp2 trains 2N steps, checkpointing at N and 2N; at N also the logits of a fixed batch and each
       rank's RNG state (made rank-specific first, so that a per-rank restore is visible);
    2. the same mesh and processes, RNG disturbed: run.resume_from=checkpoint N, steps N+1..2N, then a NaN step;
    3. tp1_dp4 restarts from a copy of the run dir whose latest checkpoint has a garbled .metadata (file sizes
       intact, so only loading finds out): it falls back to checkpoint N and trains N+1..2N;
    4. tp4_dp1: run.resume_from=checkpoint N in a new run dir, steps N+1..2N."""
    import torch.distributed as dist

    from tp2d_exp.checkpoint.manager import Progress
    from tp2d_exp.config.schema import FaultMode, NonFinite
    from tp2d_exp.train.faults import FaultInjector, NonFiniteError, check_finite
    from tp2d_exp.train.loop import setup, train_step

    rank, run_dir = dist.get_rank(), f"{root}/ray/straight"
    out: dict = {"paths": []}
    j = setup(jobs["tp2_dp2"], torch.device("cpu"))
    mgr = _manager(jobs["tp2_dp2"], j, run_dir)

    def on_step(state):
        if state.step % N:
            return
        if state.step == N:
            torch.manual_seed(1000 + rank)
            out["rng"] = torch.get_rng_state()
            out["ids"] = j.dataset.batch(torch.arange(2)).input_ids
            with torch.no_grad():
                logits = j.model(input_ids=out["ids"]).logits
                # Loss parallel (the default) leaves them sharded over the vocabulary.
                out["logits"] = logits.full_tensor() if isinstance(logits, DTensor) else logits
        out["paths"].append(mgr.write(state))

    out["losses"] = _train(j, Progress(), 2 * N, on_step)
    out["params"] = _full_params(j.model)

    torch.rand(10)
    restored = _manager(jobs["tp2_dp2"], j, f"{root}/ray/same_mesh").restore(out["paths"][0])
    same = {"path": restored.path, "step": restored.progress.step, "lr_step": j.scheduler.last_epoch,
            "rng": torch.get_rng_state(), "losses": _train(j, restored.progress, 2 * N)}
    same["params"] = _full_params(j.model)
    with FaultInjector(0, 0, FaultMode["raise"], nan_at_step=2 * N + 1, run_dir=root).maybe_nan(j.model, 2 * N + 1):
        poisoned = train_step(j, 0, 2 * N)
    same["nan_step"] = (poisoned.loss, poisoned.grad_norm)
    after = _full_params(j.model)
    same["unchanged_after_nan"] = after is None or all(torch.equal(p, same["params"][n]) for n, p in after.items())
    same["skip"] = check_finite(2 * N + 1, poisoned.loss, poisoned.grad_norm, NonFinite.skip)
    try:
        check_finite(2 * N + 1, poisoned.loss, poisoned.grad_norm, NonFinite.stop)
    except NonFiniteError as e:
        same["stop"] = str(e)
    out["same_mesh"] = same

    if rank == 0:
        shutil.copytree(run_dir, f"{root}/ray/restarted")
        meta = Path(root, "ray/restarted/checkpoint_0000006/.metadata")
        meta.write_bytes(bytes(len(meta.read_bytes())))  # same size: commit.json's sizes still match
    dist.barrier()
    for mesh, run, resume_from in (("tp1_dp4", "restarted", None), ("tp4_dp1", "fresh", out["paths"][0])):
        j = setup(jobs[mesh], torch.device("cpu"))
        restored = _manager(jobs[mesh], j, f"{root}/ray/{run}").restore(resume_from)
        out[mesh] = {"path": restored.path, "step": restored.progress.step,
                     "losses": _train(j, restored.progress, 2 * N)}
        out[mesh]["params"] = _full_params(j.model)
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    jobs = {f"tp{tp}_dp{dp}": mesh_job(root / f"tp{tp}_dp{dp}", tp, dp) for tp, dp in ((2, 2), (1, 4), (4, 1))}
    ranks = run_distributed(scenario, 4, jobs, str(root))
    return {"root": root, "run_dir": root / "ray" / "straight", "ranks": ranks}


def test_checkpoint_layout(straight):
    from tp2d_exp.checkpoint.manager import checkpoint_dirs

    paths = straight["ranks"][0]["paths"]
    assert [Path(p).name for p in paths] == ["checkpoint_0000003", "checkpoint_0000006"]
    assert checkpoint_dirs(str(straight["run_dir"])) == paths[::-1]  # newest first
    ckpt = Path(paths[0])
    state = json.loads((ckpt / "train_state.json").read_text())
    assert {k: state[k] for k in ("step", "epoch", "step_in_epoch", "samples_consumed", "world_size")} == \
        {"step": 3, "epoch": 0, "step_in_epoch": 3, "samples_consumed": 24, "world_size": 4}
    assert state["data"]["global_batch_size"] == GLOBAL_BATCH and state["scheduler"]["last_epoch"] == 3
    committed = json.loads((ckpt / "commit.json").read_text())["files"]
    assert {".metadata", "train_state.json", "hf/config.json", "hf/tokenizer.json"} <= committed.keys()
    assert {f"__{r}_0.distcp" for r in range(4)} | {f"rng_rank{r}.pt" for r in range(4)} <= committed.keys()


def test_same_mesh_resume_is_exact_and_restores_each_ranks_rng(straight):
    ranks = straight["ranks"]
    same = [r["same_mesh"] for r in ranks]
    assert same[0]["step"] == N and same[0]["lr_step"] == N
    assert same[0]["losses"] == ranks[0]["losses"][N:]  # bitwise
    for name, p in ranks[0]["params"].items():
        torch.testing.assert_close(same[0]["params"][name], p, rtol=0, atol=0, msg=name)
    for r in range(4):
        assert torch.equal(same[r]["rng"], ranks[r]["rng"]), f"rank {r}"
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])  # one state per rank, not a shared one


def test_nonfinite_step_leaves_the_weights_alone(straight):
    same = straight["ranks"][0]["same_mesh"]
    loss, grad_norm = same["nan_step"]
    assert math.isnan(loss) and math.isnan(grad_norm)
    assert same["unchanged_after_nan"]  # no optimizer update from a NaN gradient
    assert same["skip"] is False  # run.nonfinite=skip: go on without this step
    assert f"at step {2 * N + 1}" in same["stop"] and "run.nonfinite=stop" in same["stop"]


@pytest.mark.parametrize("mesh", ["tp1_dp4", "tp4_dp1"])
def test_resume_on_another_mesh_continues_the_loss_curve(straight, mesh):
    """Written under tp2_dp2 at step N, resumed under another mesh (DCP reshards model and optimizer
    state): the loss of steps N+1..2N and the final weights match the uninterrupted run. tp1_dp4 restarted
    from its run dir, whose latest checkpoint failed to load; tp4_dp1 came from run.resume_from."""
    ranks = straight["ranks"]
    resumed = ranks[0][mesh]
    assert Path(resumed["path"]).name == "checkpoint_0000003" and resumed["step"] == N
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(ranks[0]["losses"][N:]),
                               rtol=RTOL, atol=0)
    for name, p in ranks[0]["params"].items():
        torch.testing.assert_close(resumed["params"][name], p, rtol=0, atol=PARAM_ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _copy_run(straight, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(straight["run_dir"], run_dir)
    return run_dir


def test_truncated_latest_checkpoint_is_skipped_in_one_line(straight, tmp_path, caplog):
    from tp2d_exp.checkpoint.manager import intact_candidates, resolve

    run_dir = _copy_run(straight, tmp_path)
    shard = run_dir / "checkpoint_0000006" / "__1_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="tp2d_exp.checkpoint"):
        assert intact_candidates(str(run_dir)) == [str(run_dir / "checkpoint_0000003")]
    [line] = caplog.messages
    assert f"__1_0.distcp has {size // 2} of its {size} bytes" in line and "\n" not in line
    assert resolve(str(run_dir), str(tmp_path)) == str(run_dir / "checkpoint_0000003")
    assert resolve("run", str(tmp_path)) == str(run_dir / "checkpoint_0000003")  # a run name under storage


def test_uncommitted_checkpoint_does_not_count(straight, tmp_path):
    from tp2d_exp.checkpoint.manager import CheckpointError, intact_candidates, verify

    run_dir = _copy_run(straight, tmp_path)
    (run_dir / "checkpoint_0000006" / "commit.json").unlink()  # a rank died before everyone had written
    with pytest.raises(CheckpointError, match="not every rank finished writing it"):
        verify(str(run_dir / "checkpoint_0000006"))
    assert intact_candidates(str(run_dir)) == [str(run_dir / "checkpoint_0000003")]
    (run_dir / "checkpoint_0000003" / "rng_rank2.pt").unlink()
    with pytest.raises(CheckpointError, match="1 committed checkpoint.* none is intact"):
        intact_candidates(str(run_dir))


def test_checkpoint_of_another_model_is_refused_before_and_at_load(straight, tmp_path):
    from tp2d_exp.checkpoint.manager import CheckpointMismatch, check_fits
    from tp2d_exp.config.errors import ConfigError
    from tp2d_exp.train.materialize import build_meta_model

    ckpt = straight["ranks"][0]["paths"][0]
    # Before any worker starts: run.py's prepare compares the architecture with the checkpoint's config.
    with pytest.raises(ConfigError, match=r"model.hidden_size=128 \(checkpoint: 256\)") as e:
        mesh_job(tmp_path, 2, 2, ["model.hidden_size=128", f"run.resume_from={ckpt}"])
    assert "\n" not in str(e.value)
    # At load: the checkpoint's tensors against the model's, by name and global shape.
    job = compose_job(tmp_path, ["model.num_hidden_layers=5"], prepare=False)
    with pytest.raises(CheckpointMismatch, match=r"parameters 12 missing \(e.g. model.layers.4"):
        check_fits(ckpt, build_meta_model(job.model, job.arch))
    job = compose_job(tmp_path, ["model.intermediate_size=512"], prepare=False)
    with pytest.raises(CheckpointMismatch, match=r"\[768, 256\] vs \[512, 256\]"):
        check_fits(ckpt, build_meta_model(job.model, job.arch))


def test_resume_from_that_names_nothing_fails_before_workers(tmp_path):
    from tp2d_exp.config.errors import ConfigError

    with pytest.raises(ConfigError, match="run.resume_from='no_such_run' is neither a checkpoint dir"):
        mesh_job(tmp_path, 1, 1, ["run.resume_from=no_such_run"])


def test_global_batch_change_resumes_at_the_same_sample():
    from tp2d_exp.checkpoint.manager import CheckpointMismatch, DataOrderRecord, SavedProgress, data_position
    from tp2d_exp.data.order import BatchOrder

    saved = SavedProgress(step=2, epoch=0, step_in_epoch=2, data=DataOrderRecord(global_batch_size=8, num_samples=100,
                                                                                 seed=1))
    order16 = BatchOrder(num_samples=100, global_batch_size=16, micro_batch_size=4, dp=4, seed=1)
    order8 = BatchOrder(num_samples=100, global_batch_size=8, micro_batch_size=2, dp=4, seed=1)
    assert data_position(saved, order16) == (0, 1)
    # Batch 1 of the 16-sample plan is exactly the 8-sample plan's batches 2 and 3: no sample skipped or repeated.
    assert torch.equal(order16.global_batch(0, 1), torch.cat([order8.global_batch(0, 2), order8.global_batch(0, 3)]))
    with pytest.raises(CheckpointMismatch, match="run.global_batch_size=12: the checkpoint .* 16 samples into "
                                                 "epoch 0, not a multiple of it; resume with run.global_batch_size=8"):
        data_position(saved, BatchOrder(num_samples=100, global_batch_size=12, micro_batch_size=3, dp=4, seed=1))
    with pytest.raises(CheckpointMismatch, match="another data order"):
        data_position(saved, BatchOrder(num_samples=90, global_batch_size=8, micro_batch_size=2, dp=4, seed=1))
    at_end = dataclasses.replace(saved, step_in_epoch=12)  # 96 samples: past the last full 32-sample batch
    assert data_position(at_end, BatchOrder(num_samples=100, global_batch_size=32, micro_batch_size=8, dp=4,
                                           seed=1)) == (1, 0)


def test_export_round_trip_gives_the_sharded_models_logits(straight, tmp_path):
    """The checkpoint dir alone becomes a HF model dir; its logits equal the tp2_dp2 model's at that step."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import ROOT

    ckpt, out = straight["ranks"][0]["paths"][0], tmp_path / "hf"
    proc = subprocess.run([sys.executable, "scripts/export_hf.py", ckpt, str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert len(AutoTokenizer.from_pretrained(out)) == 8192
    with torch.no_grad():
        logits = model(input_ids=straight["ranks"][0]["ids"]).logits
    torch.testing.assert_close(logits, straight["ranks"][0]["logits"], rtol=1e-5, atol=1e-5)


def test_checkpoints_are_due_every_n_steps_at_epoch_ends_and_at_the_end():
    from tp2d_exp.checkpoint.manager import Progress, due
    from tp2d_exp.data.order import BatchOrder

    order = BatchOrder(num_samples=20, global_batch_size=4, micro_batch_size=4, dp=1, seed=0)  # 5 steps an epoch
    state, saved = Progress(), []
    for epoch, s in order.steps(0, 0, num_epochs=3):
        state.advance(order, epoch, s, tokens=1)
        if due(state, every=3, total_steps=12):
            saved.append(state.step)
        if state.step == 12:
            break
    assert saved == [3, 5, 6, 9, 10, 12]
    assert (state.epoch, state.step_in_epoch) == (2, 2)
