"""Held-out evaluation (tp2d_exp.train.evaluate) on real gloo process groups: the same val loss on every mesh
and with loss parallel on or off, no trace on training, and a held-out split that training never sees."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import compose_job, run_distributed

GLOBAL_BATCH = 8
# 12 samples: on dp=4 two global eval batches of 8, the second padded with 4 masked rows.
EVAL = ["data.val_fraction=0.05", "run.eval_samples=12", "data.seq_length=64", "run.batch_size_per_gpu=2",
        f"run.global_batch_size={GLOBAL_BATCH}"]
STEPS = 2
# Step 0: identical parameters, so only the order of fp32 operations inside a forward differs (sharded
# matmuls, vocab-parallel cross-entropy): 1e-6 relative. After training steps: the parity tolerance.
FIRST_RTOL, RTOL = 1e-6, 1e-5


def evaluate_while_training(job, steps: int) -> dict:
    """Val loss before any step and after each of `steps` steps, with the training losses."""
    from tp2d_exp.train.loop import evaluate_heldout, setup, train_step
    from tp2d_exp.train.optim import set_lr

    j = setup(job, torch.device("cpu"))
    batch = j.order.global_batch_size
    vals, losses = [evaluate_heldout(j)], []
    for k in range(steps):
        set_lr(j.optimizer, j.spec.resolved.schedule.lr(k * batch, batch))
        losses.append(train_step(j, 0, k * batch).loss)
        vals.append(evaluate_heldout(j))
    return {"val": [v.loss for v in vals], "tokens": [v.tokens for v in vals], "losses": losses}


def train_only(job, steps: int) -> list[float]:
    from tp2d_exp.train.loop import setup, train_step
    from tp2d_exp.train.optim import set_lr

    j = setup(job, torch.device("cpu"))
    batch = j.order.global_batch_size
    losses = []
    for k in range(steps):
        set_lr(j.optimizer, j.spec.resolved.schedule.lr(k * batch, batch))
        losses.append(train_step(j, 0, k * batch).loss)
    return losses


MESHES = {"tp1_dp1": [], "tp1_dp4": [], "tp2_dp2": [],
          "tp2_dp2_sp_nolp": ["parallelism.sequence_parallel=true", "parallelism.loss_parallel=false"],
          "tp4_dp1": [], "tp4_dp1_nolp": ["parallelism.loss_parallel=false"]}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for name, extra in MESHES.items():
        tp, dp = (int(x[2:]) for x in name.split("_")[:2])
        job = compose_job(root / name, [f"parallelism=tp{tp}_dp{dp}", *EVAL, *extra])
        out[name] = run_distributed(evaluate_while_training, tp * dp, job, STEPS)
    return out


@pytest.mark.slow  # six meshes set up and trained (~35 s): the quick loop runs the unit tests below
def test_val_loss_is_the_same_on_every_mesh_with_and_without_loss_parallel(evaluated):
    """tp1_dp1, tp1_dp4, tp2_dp2 and tp4_dp1, loss parallel on (the default) and off; sequence parallel."""
    reference = evaluated["tp1_dp1"][0]
    assert reference["tokens"][0] == 12 * 63  # 12 packed samples of 64 tokens, 63 predicted each
    assert reference["val"][-1] < reference["val"][0]  # it learns, and the held-out loss shows it
    for name, ranks in evaluated.items():
        for rank in ranks:  # every rank reports the same number
            assert rank["tokens"] == reference["tokens"]
            assert rank["val"][0] == pytest.approx(reference["val"][0], rel=FIRST_RTOL), name
            assert rank["val"] == pytest.approx(reference["val"], rel=RTOL), name


@pytest.mark.slow  # reads the six-mesh fixture
def test_evaluation_leaves_training_bit_identical(evaluated, tmp_path):
    """The same tp2_dp2 job trained without evaluating: the same losses, bit for bit."""
    job = compose_job(tmp_path, ["parallelism=tp2_dp2", *EVAL])
    plain = run_distributed(train_only, 4, job, STEPS)
    assert plain[0] == evaluated["tp2_dp2"][0]["losses"]


def test_the_last_eval_batch_is_padded_and_masked_not_dropped():
    from tp2d_exp.train.evaluate import PADDING, eval_indices

    # 11 samples, micro-batches of 2 on dp=2: global eval batches of 4, the last holding 3 samples.
    shares = [eval_indices(11, 2, 2, rank) for rank in (0, 1)]
    assert [b.tolist() for b in shares[0]] == [[0, 1], [4, 5], [8, 9]]
    assert [b.tolist() for b in shares[1]] == [[2, 3], [6, 7], [10, PADDING]]


def test_held_out_documents_never_reach_training(tmp_path):
    """A marker document at the end of a text corpus is in the held-out store and nowhere in training's."""
    from tp2d_exp.data.dataset import Split, open_samples
    from tp2d_exp.data.synthetic import documents
    from tp2d_exp.data.tokenizer import load_tokenizer

    marker = "Zebra quartz marker document " * 20
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([*documents(95, seed=3), marker.strip()]) + "\n")
    job = compose_job(tmp_path, ["data=text_files", f"data.path={corpus}", "data.val_fraction=0.01",
                                 "data.seq_length=32"])
    r = job.resolved
    train = open_samples(job)
    heldout = open_samples(job, Split.heldout)
    assert r.num_heldout_samples == len(heldout) > 0 and r.num_samples == len(train)
    tok = load_tokenizer(r.tokenizer_dir)
    assert "Zebra quartz marker" in tok.decode(heldout.input_ids.flatten().tolist())
    assert "Zebra" not in tok.decode(train.input_ids.flatten().tolist())
    assert train.digest != heldout.digest


def test_a_held_out_set_below_one_eval_batch_is_refused_in_one_line(tmp_path):
    from tp2d_exp.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"the held-out set scores 3 samples \(run.eval_samples=3.*fewer than one "
                                          r"global eval batch \(run.batch_size_per_gpu=2 x parallelism.dp=2\)"):
        compose_job(tmp_path, ["parallelism=tp1_dp2", *EVAL, "run.eval_samples=3"])
    with pytest.raises(ConfigError, match="data.val_fraction=0.0001 holds out documents that make no sample"):
        compose_job(tmp_path, [*EVAL, "data.val_fraction=0.0001", "data.seq_length=1024"])


def test_perplexity_is_the_exponent_of_the_token_mean_loss():
    from tp2d_exp.train.evaluate import EvalResult

    assert EvalResult(loss=2.0, tokens=10, samples=1).ppl == pytest.approx(math.exp(2.0))


def test_the_objective_is_the_held_out_loss_when_there_is_one(tmp_path, capsys):
    """What run.py returns to Hydra (a sweeper minimises it): the final val loss, else the final loss."""
    from tp2d_exp.driver.job import _objective
    from tp2d_exp.records import RunStatus, RunSummary

    done = dict(status=RunStatus.completed, steps=4, first_loss=9.0, final_loss=6.0, tokens_per_s=1.0, wall_time_s=1.0)
    assert _objective(RunSummary(**done, final_val_loss=6.5), multirun=True, out=tmp_path) == 6.5
    assert "val loss 6.5000" in capsys.readouterr().out
    assert _objective(RunSummary(**done), multirun=True, out=tmp_path) == 6.0
