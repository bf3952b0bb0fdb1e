"""The planner against published H100 runs: torchtitan's Llama-3.1-8B FSDP benchmarks
(benchmarks/llama3_h100_202412_torchtitan.md, tables 1 and 3: seq 8192, local batch 2, selective AC, bf16,
no compile, H100 96 GB HBM2e at 500 W, 8 GPUs per host on NVLink, 400 Gb/s RDMA per GPU), memory = max
reserved. The planner's three fitted constants come from these two rows (scripts/fit_plan_constants.py);
everything else, TP included, is first principles. Plus the guard every real launch runs: a plan that does
not fit warns in one line, naming the levers that would."""

from __future__ import annotations

import pytest

from tests.conftest import GiB, compose_job
from tp2d_exp.perf.planner import CPU_DRIVER_BYTES, make_plan, memory_guard

PUBLISHED = {8: (5762, 82.4), 128: (5605, 67.0)}  # dp -> (TPS/GPU, max reserved GiB)
LLAMA = ["model=llama3_8b", "data.seq_length=8192", "run.batch_size_per_gpu=2", "run.activation_checkpointing=selective",
         "hardware=h100_nvlink_ib", "hardware.gpu=h100_96gb", "parallelism.tp=1"]


@pytest.mark.parametrize("dp", PUBLISHED)
def test_fsdp_llama3_8b_within_15_percent_of_torchtitan(tmp_path, dp):
    tps, reserved = PUBLISHED[dp]
    plan = make_plan(compose_job(tmp_path, [*LLAMA, f"parallelism.dp={dp}", f"run.global_batch_size={2 * dp}"],
                                 prepare=False))
    assert plan.plan.tokens_per_s_per_device == pytest.approx(tps, rel=0.15)
    assert plan.memory.predicted.total / GiB == pytest.approx(reserved, rel=0.15)
    assert plan.memory.fits and plan.plan.nodes == dp // 8
    # 1 node: FSDP rides NVLink and hides behind compute; 16 nodes: InfiniBand, some of it exposed
    assert plan.comm.links["dp"].link == ("intra_node" if dp == 8 else "inter_node")
    assert 0 < plan.plan.dp_exposed_s < plan.plan.dp_time_s and plan.plan.tp_exposed_s == 0


def test_tp_pays_for_its_all_reduces_and_smaller_gemms(tmp_path):
    """Same 8 GPUs, same global batch: TP8 runs every GEMM 8x narrower and all-reduces on the critical path;
    the plan ranks FSDP8 first on throughput, with no TP-specific factor anywhere."""
    plans = {tp: make_plan(compose_job(tmp_path / str(tp), [*LLAMA[:-1], f"parallelism.tp={tp}", f"parallelism.dp={8 // tp}",
                                                            "run.global_batch_size=16"], prepare=False))
             for tp in (1, 8)}
    assert plans[8].plan.tp_exposed_s > 0 and plans[1].plan.tp_exposed_s == 0
    assert plans[1].plan.mfu > plans[8].plan.mfu
    assert plans[8].memory.predicted.total < plans[1].memory.predicted.total


def test_qwen_0_5b_on_four_cpu_ranks_warns_before_launch_and_names_the_levers(tmp_path):
    """The issue's case: Qwen2.5-0.5B's architecture (151,936 vocab) on tp2_dp2, seq 512, batch 1, fp32 on this
    24 GiB machine (OOM-killed in step 2). The guard runs where the launch would, before any worker."""
    spec = compose_job(tmp_path, ["model=qwen2_5_0_5b", "model.pretrained=false", "parallelism=tp2_dp2",
                                  "data.seq_length=512", "run.batch_size_per_gpu=1", "run.global_batch_size=0"],
                       prepare=False)
    # This machine idle (MemAvailable 23,431 MB of 24,105, 2026-12-05), with the driver and Ray's processes
    # still to start beside the four workers (a local launch reads MemAvailable once they run instead).
    available = 23_431 * 2**20
    warning = memory_guard(spec, use_gpu=False, node_bytes=available, ranks_per_node=4,
                           others_bytes=CPU_DRIVER_BYTES)
    assert warning is not None and "\n" not in warning
    assert warning.startswith("predicted peak memory does not fit (4 ranks x ")
    assert "run.activation_checkpointing=full" in warning
    tiny = compose_job(tmp_path / "tiny", [], prepare=False)
    assert memory_guard(tiny, use_gpu=False, node_bytes=available, ranks_per_node=4,
                        others_bytes=CPU_DRIVER_BYTES) is None
