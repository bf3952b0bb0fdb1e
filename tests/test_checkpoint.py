"""Checkpoints over real gloo process groups: resume on the same and on other meshes, fall back past a broken
latest checkpoint, refuse one that does not fit, export to Hugging Face, guard against non-finite steps."""

from __future__ import annotations

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


def _manager(job, j, run_dir: str, committed: list | None = None):
    from tp2d_exp.checkpoint.manager import CheckpointManager

    return CheckpointManager(job, j.model, j.optimizer, j.order, run_dir, j.model.config,
                             on_commit=lambda path, row: committed is not None and committed.append(path))


def _full_params(model) -> dict[str, torch.Tensor] | None:
    """Every parameter unsharded, on rank 0 (gathering is collective: every rank calls this)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}
    return full if dist.get_rank() == 0 else None


def _train(j, state, steps: int, on_step=None) -> list[float]:
    from tp2d_exp.train.loop import train_step

    losses = []
    for epoch, s in j.order.steps(state.epoch, state.sample_in_epoch, 1):
        if state.step >= steps:
            break
        result = train_step(j, epoch, s)
        state.advance(j.order, epoch, s, result.tokens)
        losses.append(result.loss)
        if on_step:
            on_step(state)
    return losses


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def scenario(jobs: dict, root: str) -> dict:
    """One set of 4 gloo ranks (process start-up dominates on CPU), one mesh after another:
    1. tp2_dp2 trains 2N steps, checkpointing at N and 2N; at N also the logits of a fixed batch and each
       rank's RNG state (made rank-specific first, so that a per-rank restore is visible);
    2. the same mesh and processes, RNG disturbed: run.resume_from=checkpoint N, steps N+1..2N, then a NaN step;
    3. tp1_dp4 restarts from a copy of the run dir whose latest checkpoint has one flipped byte in a shard
       (sizes intact, so only the ranks' checksums find out): every rank falls back to checkpoint N together
       and trains N+1..2N;
    4. tp4_dp1: run.resume_from=checkpoint N in a new run dir, steps N+1..2N;
    5. tp2_dp2 with another weight decay and betas: run.resume_from=checkpoint N; its optimizer keeps them."""
    import torch.distributed as dist

    from tp2d_exp.checkpoint.manager import Progress
    from tp2d_exp.config.schema import FaultMode, NonFinite
    from tp2d_exp.train.faults import FaultInjector, NonFiniteError, check_finite
    from tp2d_exp.train.loop import setup, train_step

    rank, run_dir = dist.get_rank(), f"{root}/ray/straight"
    out: dict = {"paths": []}
    j = setup(jobs["tp2_dp2"], torch.device("cpu"))
    mgr = _manager(jobs["tp2_dp2"], j, run_dir, out["paths"])

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
        mgr.save(state, None)

    out["losses"] = _train(j, Progress(), 2 * N, on_step)
    out["params"] = _full_params(j.model)

    torch.rand(10)
    restored = _manager(jobs["tp2_dp2"], j, f"{root}/ray/same_mesh").restore(out["paths"][0])
    same = {"path": restored.path, "step": restored.progress.step, "rng": torch.get_rng_state(), "losses": _train(j, restored.progress, 2 * N)}
    same["params"] = _full_params(j.model)
    with FaultInjector(0, 0, FaultMode["raise"], nan_at_step=2 * N + 1, run_dir=root).maybe_nan(j.model, 2 * N + 1):
        poisoned = train_step(j, 0, 2 * N * GLOBAL_BATCH)
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
        shard = Path(root, "ray/restarted/checkpoint_0000006/__2_0.distcp")
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: commit.json's sizes still match
        shard.write_bytes(bytes(data))
        Path(root, "ray/restarted/checkpoint_0000009").mkdir()  # an attempt died writing it: never committed
        Path(root, "ray/restarted/checkpoint_0000009/__0_0.distcp").write_bytes(b"partial")
    dist.barrier()
    for mesh, run, resume_from in (("tp1_dp4", "restarted", None), ("tp4_dp1", "fresh", out["paths"][0])):
        j = setup(jobs[mesh], torch.device("cpu"))
        warnings = _Lines()
        logging.getLogger("tp2d_exp.checkpoint").addHandler(warnings)
        try:
            restored = _manager(jobs[mesh], j, f"{root}/ray/{run}").restore(resume_from)
        finally:
            logging.getLogger("tp2d_exp.checkpoint").removeHandler(warnings)
        out[mesh] = {"path": restored.path, "step": restored.progress.step, "warnings": warnings.lines,
                     "dirs_after": sorted(p.name for p in Path(root, "ray", run).glob("checkpoint_*")),
                     "losses": _train(j, restored.progress, 2 * N)}
        out[mesh]["params"] = _full_params(j.model)
    j = setup(jobs["new_hyper"], torch.device("cpu"))
    _manager(jobs["new_hyper"], j, f"{root}/ray/new_hyper").restore(out["paths"][0])
    out["new_hyper"] = [{k: g[k] for k in ("weight_decay", "betas")} for g in j.optimizer.param_groups]
    out["new_hyper_state"] = len(j.optimizer.state)  # Adam moments came from the checkpoint
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    jobs = {f"tp{tp}_dp{dp}": mesh_job(root / f"tp{tp}_dp{dp}", tp, dp) for tp, dp in ((2, 2), (1, 4), (4, 1))}
    jobs["new_hyper"] = mesh_job(root / "new_hyper", 2, 2, ["run.weight_decay=0.05", "run.adam_beta1=0.8"])
    ranks = run_distributed(scenario, 4, jobs, str(root))
    return {"root": root, "run_dir": root / "ray" / "straight", "ranks": ranks}


def test_checkpoint_layout(straight):
    from tp2d_exp.checkpoint.manager import checkpoint_dirs

    paths = straight["ranks"][0]["paths"]
    assert [Path(p).name for p in paths] == ["checkpoint_0000003", "checkpoint_0000006"]
    assert checkpoint_dirs(str(straight["run_dir"])) == paths[::-1]  # newest first
    ckpt = Path(paths[0])
    state = json.loads((ckpt / "train_state.json").read_text())
    assert {k: state[k] for k in ("step", "epoch", "sample_in_epoch", "samples_consumed", "world_size",
                                  "global_batch_size")} == \
        {"step": 3, "epoch": 0, "sample_in_epoch": 24, "samples_consumed": 24, "world_size": 4, "global_batch_size": 8}
    # The schedule in samples, fixed by this run's first start (2N steps of 8), and the settings behind it.
    assert state["schedule"]["end_samples"] == 2 * N * GLOBAL_BATCH
    assert state["settings"]["max_steps"] == 2 * N and state["architecture"]["rope_theta"] == 1e6
    assert len(state["data"]["digest"]) == 32
    committed = json.loads((ckpt / "commit.json").read_text())["files"]
    assert all(set(f) == {"size", "crc32"} for f in committed.values())
    assert {".metadata", "train_state.json", "hf/config.json", "hf/tokenizer.json"} <= committed.keys()
    assert {f"__{r}_0.distcp" for r in range(4)} | {f"rng_rank{r}.pt" for r in range(4)} <= committed.keys()


def test_same_mesh_resume_is_exact_and_restores_each_ranks_rng(straight):
    ranks = straight["ranks"]
    same = [r["same_mesh"] for r in ranks]
    assert same[0]["step"] == N
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
    if mesh == "tp1_dp4":  # the flipped shard byte: found by one rank's checksum, every rank fell back together
        removed = [x for x in ranks[0][mesh]["warnings"] if x.startswith("removed")]  # rank 0 cleans up
        assert len(removed) == 1 and "checkpoint_0000009: never committed" in removed[0]
        for r in ranks:
            [line] = [x for x in r[mesh]["warnings"] if "skipping" in x]
            assert "checkpoint_0000006 is corrupt: __2_0.distcp does not match its committed checksum" in line
        # The uncommitted dir is gone; both committed ones stay, the corrupt one too (nothing else is deleted).
        assert resumed["dirs_after"] == ["checkpoint_0000003", "checkpoint_0000006"]
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


def test_another_global_batch_resumes_at_the_saved_sample():
    """The position is a sample of the epoch's order: any global batch size resumes there, aligned or not,
    and every sample of the epoch is trained once."""
    from tp2d_exp.checkpoint.manager import Progress
    from tp2d_exp.data.order import BatchOrder

    order8, order16, order12 = (BatchOrder(num_samples=100, global_batch_size=g, micro_batch_size=g // 4, dp=4, seed=1)
                                for g in (8, 16, 12))
    # Batch 16 at sample 16 is exactly the 8-sample plan's batches 2 and 3.
    assert torch.equal(order16.global_batch(0, 16), torch.cat([order8.global_batch(0, 16), order8.global_batch(0, 24)]))
    progress = Progress()
    for epoch, start in order8.steps(0, 0, 1):  # 5 steps of 8: 40 samples
        progress.advance(order8, epoch, start, tokens=1)
        if progress.step == 5:
            break
    seen = [order8.order(0)[:40]]
    for epoch, start in order12.steps(progress.epoch, progress.sample_in_epoch, 1):  # 40 is no multiple of 12
        seen.append(order12.global_batch(epoch, start))
        progress.advance(order12, epoch, start, tokens=1)
    seen = torch.cat(seen)
    assert len(seen) == 40 + 5 * 12 == len(set(seen.tolist()))  # 60 more, none twice; the last 0 dropped
    assert (progress.epoch, progress.sample_in_epoch, progress.samples_consumed) == (1, 0, 100)
    assert order12.end_samples(40, 0, 40, num_epochs=2) == 100 + 8 * 12


def test_schedule_is_counted_in_samples():
    """The LR, the run length and the checkpoint and log marks are functions of samples consumed, converted
    from steps with the first start's global batch size."""
    from tp2d_exp.config.schedule import Schedule, crossed
    from tp2d_exp.config.schema import RunConfig

    run = RunConfig(max_steps=12, warmup_steps=2, learning_rate=1e-3, min_lr_ratio=0.1, checkpoint_every=3,
                    log_interval=5)
    s = Schedule.of(run, global_batch_size=8, end_samples=10_000)
    assert (s.end_samples, s.warmup_samples, s.decay_samples, s.checkpoint_every_samples, s.log_every_samples) == \
        (96, 16, 96, 24, 40)
    assert s.lr(0, 8) == pytest.approx(0.5e-3) and s.lr(8, 8) == pytest.approx(1e-3)  # warmup: steps 1, 2
    assert s.lr(56, 8) == pytest.approx(s.lr(56, 16)) and s.lr(96, 16) == pytest.approx(1e-4) == s.lr(200, 4)
    assert [k for k in range(1, 13) if crossed(s.checkpoint_every_samples, (k - 1) * 8, k * 8)] == [3, 6, 9, 12]
    # At batch 16, the same sample marks rounded to its own steps: after 32, 48, 80 and 96 samples.
    assert [k for k in range(1, 7) if crossed(s.checkpoint_every_samples, (k - 1) * 16, k * 16)] == [2, 3, 5, 6]
    assert s.steps_left(48, 16) == 3 and s.steps_left(48, 5) == 10
    assert Schedule.of(RunConfig(max_steps=0), 8, end_samples=96).end_samples == 96


@pytest.mark.slow  # a second load of the checkpoint in this process (~6 s)
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


def test_checkpoints_are_due_at_sample_marks_epoch_ends_and_the_end():
    from tp2d_exp.checkpoint.manager import Progress, due
    from tp2d_exp.data.order import BatchOrder

    order = BatchOrder(num_samples=20, global_batch_size=4, micro_batch_size=4, dp=1, seed=0)  # 5 steps an epoch
    state, saved = Progress(), []
    for epoch, s in order.steps(0, 0, num_epochs=3):
        before = state.samples_consumed
        state.advance(order, epoch, s, tokens=1)
        if due(state, before, every_samples=12, last=state.step == 12):
            saved.append(state.step)
        if state.step == 12:
            break
    assert saved == [3, 5, 6, 9, 10, 12]
    assert (state.epoch, state.sample_in_epoch) == (2, 8)


def test_resume_from_with_new_hyperparameters_uses_them(straight):
    """The optimizer state (Adam moments) comes from the checkpoint, its hyperparameters from the job."""
    out = straight["ranks"][0]
    assert out["new_hyper"] == [{"weight_decay": 0.05, "betas": (0.8, 0.95)}, {"weight_decay": 0.0, "betas": (0.8, 0.95)}]
    assert out["new_hyper_state"] > 0


def _storage_job(straight, tmp_path, extra: list[str]):
    """A job of the straight run's settings whose storage holds that run (run.name=straight continues it)."""
    return mesh_job(tmp_path, 2, 2, [f"cluster.storage_path={straight['root'] / 'ray'}", *extra])


def test_a_same_name_rerun_refuses_other_hyperparameters_in_one_line(straight, tmp_path):
    from tp2d_exp.config.errors import ConfigError

    job = _storage_job(straight, tmp_path, ["run.name=straight", "run.global_batch_size=16",
                                            "run.batch_size_per_gpu=4"])  # batch and mesh may change
    assert job.resolved.schedule.end_samples == 2 * N * GLOBAL_BATCH  # the run's, not 2N steps of 16
    assert job.resolved.start_samples == 2 * N * GLOBAL_BATCH
    for key, value in (("learning_rate", 2e-3), ("adam_beta2", 0.99), ("warmup_steps", 3), ("max_steps", 9)):
        with pytest.raises(ConfigError) as e:
            _storage_job(straight, tmp_path, ["run.name=straight", f"run.{key}={value}"])
        assert str(e.value).startswith(f"run.{key}={value} (checkpoint: ") and "\n" not in str(e.value)
        assert "run.resume_from" in str(e.value)


def test_resume_from_names_each_changed_setting(straight, tmp_path, caplog):
    ckpt = straight["ranks"][0]["paths"][0]
    with caplog.at_level(logging.WARNING, logger="tp2d_exp.driver.prepare"):
        job = mesh_job(tmp_path, 2, 2, [f"run.resume_from={ckpt}", "run.learning_rate=5e-4", "run.max_steps=10"])
    assert caplog.messages == ["run.resume_from: run.learning_rate=0.0005 (checkpoint: 0.003)",
                               "run.resume_from: run.max_steps=10 (checkpoint: 6)"]
    # A new run from the checkpoint's sample position, on its own schedule: 10 steps of 8 in all.
    assert job.resolved.start_samples == N * GLOBAL_BATCH and job.resolved.schedule.end_samples == 80
    assert job.resolved.schedule.learning_rate == 5e-4


@pytest.mark.parametrize("override, says", [
    ("data.synthetic_documents=1500", "belongs to another corpus or order: the token data differ"),
    ("run.seed=7", "run.seed=7 (checkpoint: 42)"),
    ("model.rope_theta=10000.0", "model.rope_theta=10000.0 (checkpoint: 1000000.0)"),
])
def test_a_checkpoint_of_another_corpus_order_or_rope_is_refused_in_one_line(straight, tmp_path, override, says):
    from tp2d_exp.config.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        mesh_job(tmp_path, 2, 2, [f"run.resume_from={straight['ranks'][0]['paths'][0]}", override])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_data_identity_is_the_content_not_the_files(tmp_path):
    """A copied or touched corpus is the same corpus; one changed word is another."""
    import os

    from tp2d_exp.data.synthetic import documents

    text = "\n".join(documents(200, seed=0))
    first, copy = tmp_path / "a" / "corpus.txt", tmp_path / "b" / "renamed.txt"
    for f in (first, copy):
        f.parent.mkdir()
        f.write_text(text)
    os.utime(copy, (1e9, 1e9))
    job = compose_job(tmp_path, ["data=text_files", f"data.path={first}", "data.seq_length=64"])
    digest = job.resolved.data_digest
    again = compose_job(tmp_path, ["data=text_files", f"data.path={copy}", "data.seq_length=64"])
    assert again.resolved.data_digest == digest
    copy.write_text(text.replace(text.split()[5], "zebra", 1))
    changed = compose_job(tmp_path, ["data=text_files", f"data.path={copy}", "data.seq_length=64"])
    assert changed.resolved.data_digest != digest


def async_scenario(job, root: str) -> dict:
    """tp2_dp2: save asynchronously after step 1 and train on while DCP writes in the background, then load
    that checkpoint into a second manager and compare with the weights at save time."""
    import torch.distributed as dist

    from tp2d_exp.checkpoint.manager import CheckpointManager, Progress
    from tp2d_exp.train.loop import setup, train_step

    j = setup(job, torch.device("cpu"))
    committed: list = []
    mgr = CheckpointManager(job, j.model, j.optimizer, j.order, f"{root}/ray/async", j.model.config,
                            on_commit=lambda path, row: committed.append((path, row)), async_save=True)
    progress = Progress()
    _train(j, progress, 1)
    at_save = _full_params(j.model)
    mgr.save(progress, "row of step 1")
    pending_after_save = mgr.pending is not None
    for _ in range(3):
        result = train_step(j, progress.epoch, progress.sample_in_epoch)
        progress.advance(j.order, progress.epoch, progress.sample_in_epoch, result.tokens)
        mgr.poll()
    mgr.close()
    fresh = setup(job, torch.device("cpu"))
    restored = _manager(job, fresh, f"{root}/ray/async").restore(None)
    return {"committed": committed, "pending_after_save": pending_after_save, "stalls": mgr.stalls,
            "restored_step": restored.progress.step,
            "at_save": at_save, "restored": _full_params(fresh.model), "rank": dist.get_rank()}


def test_an_async_save_overlaps_training_and_commits_the_state_at_save_time(tmp_path):
    from tp2d_exp.checkpoint.store import verify

    job = mesh_job(tmp_path, 2, 2, ["run.checkpoint_async=true"])
    ranks = run_distributed(async_scenario, 4, job, str(tmp_path))
    for r in ranks:
        [(path, row)] = r["committed"]  # reported once, with the row of the step it holds, on every rank
        assert Path(path).name == "checkpoint_0000001" and row == "row of step 1"
        assert r["pending_after_save"] and r["restored_step"] == 1 and len(r["stalls"]) == 1
    verify(ranks[0]["committed"][0][0], checksum_below=1 << 62)  # every file against commit.json
    # Training went on (and changed the weights) while the write ran; the checkpoint holds step 1's weights.
    for name, p in ranks[0]["at_save"].items():
        torch.testing.assert_close(ranks[0]["restored"][name], p, rtol=0, atol=0, msg=name)
