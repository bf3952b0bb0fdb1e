"""The mesh shape changes speed, never the math: every mesh reproduces tp1_dp1's loss curve and parameters
for the same global batches (fp32 on CPU over real gloo process groups)."""

from __future__ import annotations

import time

import pytest
import torch

from tests.conftest import run_distributed

STEPS = 5
GLOBAL_BATCH = 8
# fp32 sums in a different order (sharded matmuls, reduce-scatter vs local sum) differ by a few ulps per op;
# over 5 optimizer steps that stays below 1e-5 relative. A real bug (wrong normalisation, wrong shard,
# missing gradient) moves the loss by >1e-3 at the first step after it.
RTOL = 1e-5
# Parameters: Adam turns ulp-level gradient differences on near-zero gradients (k_proj biases, whose true
# gradient is 0 because softmax ignores a per-query shift) into steps of up to lr, so compare against a small
# fraction of one step: 3e-5 = 3% of lr 1e-3. A shard applied to the wrong rows moves weights by ~1e-2.
PARAM_ATOL = 3e-5


def train_and_collect(job: dict, steps: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from tp2d_exp.train import setup, train_step

    j = setup(job, torch.device("cpu"))
    t0 = time.perf_counter()
    losses = [train_step(j, 0, s).loss for s in range(steps)]
    elapsed = time.perf_counter() - t0
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in j.model.named_parameters()}
    return {"losses": losses, "params": params if dist.get_rank() == 0 else None, "step_s": elapsed / steps}


def run_mesh(job_factory, tp: int, dp: int, extra: list[str] = ()) -> list[dict]:
    micro = GLOBAL_BATCH // dp
    job = job_factory([f"parallelism=tp{tp}_dp{dp}", f"run.global_batch_size={GLOBAL_BATCH}",
                       f"run.batch_size_per_gpu={micro}", "data.seq_length=64", *extra])
    return run_distributed(train_and_collect, tp * dp, job, STEPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from tests.conftest import compose_job

    factory = lambda o, **kw: compose_job(tmp_path_factory.mktemp("ref"), o, **kw)  # noqa: E731
    return run_mesh(factory, 1, 1)[0]


@pytest.mark.parametrize("tp,dp", [(2, 2), (1, 4), (4, 1)], ids=["tp2_dp2", "tp1_dp4", "tp4_dp1"])
def test_mesh_reproduces_single_process(job_factory, reference, tp, dp):
    ranks = run_mesh(job_factory, tp, dp)
    for r in ranks:  # the logged loss is the same number on every rank
        assert r["losses"] == ranks[0]["losses"]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(reference["losses"]),
                               rtol=RTOL, atol=0)
    for name, p in reference["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], p, rtol=0, atol=PARAM_ATOL, msg=name)
    assert reference["losses"][-1] < reference["losses"][0]  # it trains


def test_gradient_accumulation_keeps_the_math(job_factory, reference):
    """tp1_dp2 with micro-batch 2 accumulates 2 micro-batches per step: same global batch, same loss."""
    job = job_factory(["parallelism=tp1_dp2", f"run.global_batch_size={GLOBAL_BATCH}", "run.batch_size_per_gpu=2",
                       "data.seq_length=64"])
    ranks = run_distributed(train_and_collect, 2, job, STEPS)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(reference["losses"]),
                               rtol=RTOL, atol=0)
