"""The analytic model's inputs and the plan built on it, checked against real Hugging Face models (built on
the meta device: no weights) and the project's config presets. Collective bytes are checked against measured
runs in tests/test_comm.py."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import compose_job
from tp2d_exp.config.parallel_dims import ParallelDims
from tp2d_exp.perf import analysis
from tp2d_exp.perf.planner import make_plan
from tp2d_exp.records import Link

PRESETS = ["tiny", "qwen2_5_0_5b", "qwen2_7b", "llama3_8b", "mistral_7b"]


def model_cfg(tmp_path, name: str):
    """The architecture of a model preset."""
    return compose_job(tmp_path, [f"model={name}"], prepare=False).arch


def meta_model(arch):
    from transformers import AutoModelForCausalLM

    from tp2d_exp.train.materialize import hf_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(arch))


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_inventory_matches_the_real_model(tmp_path, name):
    arch = model_cfg(tmp_path, name)
    model = meta_model(arch)
    layer0 = {n.removeprefix("model.layers.0."): tuple(p.shape) for n, p in model.named_parameters()
              if n.startswith("model.layers.0.")}
    assert {p.name: p.shape for p in analysis.layer_params(arch)} == layer0
    root = {n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith("model.layers.")}
    assert {p.name: p.shape for p in analysis.root_params(arch)} == root  # tied lm_head is not listed twice
    assert analysis.param_count(arch) == sum(p.numel() for p in model.parameters())


def test_published_parameter_counts(tmp_path):
    counts = {n: analysis.param_count(model_cfg(tmp_path, n)) for n in ("qwen2_7b", "llama3_8b", "mistral_7b")}
    assert counts == {"qwen2_7b": 7_615_616_512, "llama3_8b": 8_030_261_248, "mistral_7b": 7_241_732_096}


@pytest.mark.parametrize("name", ["tiny", "qwen2_7b"])
def test_flops_per_token_counts_every_matmul(tmp_path, name):
    """6 x the weights of every nn.Linear of the real model (lm_head included) + the attention term."""
    arch = model_cfg(tmp_path, name)
    # A tied lm_head is an nn.Linear sharing the embedding's weight: a matmul, so counted; the lookup is not.
    linear = sum(m.weight.numel() for m in meta_model(arch).modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * arch.num_hidden_layers * arch.hidden_size * 512
    assert analysis.flops_per_token(arch, 512) == 6 * linear + attention


def test_plan_says_what_fits_and_where_traffic_goes(tmp_path):
    plans = {}
    for mesh in ("tp1_dp1", "tp4_dp2", "tp1_dp8", "tp2_dp4"):
        job = compose_job(tmp_path / mesh, ["model=qwen2_7b", f"parallelism={mesh}", "run.global_batch_size=16"],
                          prepare=False)
        plans[mesh] = make_plan(job)
    # 7.6B params x 16 bytes (fp32 weights, grads, two AdamW states) = 122 GB: never on one 80 GB GPU.
    assert not plans["tp1_dp1"].memory.fits
    assert plans["tp1_dp1"].memory.predicted.params == 4 * 7_615_616_512
    assert plans["tp4_dp2"].memory.fits and plans["tp1_dp8"].memory.fits
    # TP traffic only with tp > 1; FSDP traffic shrinks with dp only through the embeddings (replicated over
    # tp, so every TP rank gathers them whole).
    assert plans["tp1_dp8"].comm.predicted_bytes["tp"].bytes == 0
    assert plans["tp4_dp2"].comm.predicted_bytes["tp"].bytes > plans["tp2_dp4"].comm.predicted_bytes["tp"].bytes
    for p in plans.values():
        assert p.comm.links["tp"].link == p.comm.links["dp"].link == "intra_node"
        assert math.isclose(p.plan.step_time_s, p.plan.compute_time_s + p.plan.exposed_comm_s)


def test_two_nodes_put_dp_on_infiniband(tmp_path):
    job = compose_job(tmp_path, ["model=qwen2_7b", "parallelism.tp=4", "parallelism.dp=4"], prepare=False)
    plan = make_plan(job)
    assert plan.plan.nodes == 2
    assert plan.comm.links == {"tp": Link(link="intra_node", gbps=360.0, latency_us=10.0),
                               "dp": Link(link="inter_node", gbps=45.0, latency_us=25.0)}


def test_tp_traffic_against_the_tutorial_formula(tmp_path):
    """Our TP plan all-reduces 7 times per layer and micro-batch (2 fwd, 5 bwd) where the tutorial counts 4;
    FSDP moves params in bf16 twice (gather, re-gather) and grads in fp32 once: about 8 bytes per param
    against the tutorial's 2 (README: 'Reading the numbers')."""
    arch = model_cfg(tmp_path, "qwen2_7b")
    # The tutorial's plan: no loss parallel, no sequence parallel.
    tp_shape = analysis.StepShape(ParallelDims(tp=4, dp=2, loss_parallel=False), micro_batch=1, accumulation=2,
                                  seq_length=4096, compute_bytes=2)
    tp = analysis.totals(analysis.predict_collectives(arch, tp_shape))["tp"]["all_reduce"].bytes
    assert tp / analysis.rough_tutorial_bytes(arch, tp_shape)["tp"] == pytest.approx(7 / 4, rel=1e-6)
    # Pure FSDP: the last layer and the root are not re-gathered in backward, hence a little under 8.
    dp_shape = analysis.StepShape(ParallelDims(tp=1, dp=8), micro_batch=1, accumulation=1, seq_length=4096,
                                  compute_bytes=2)
    dp = analysis.totals(analysis.predict_collectives(arch, dp_shape))["dp"]
    fsdp = dp["all_gather"].bytes + dp["reduce_scatter"].bytes
    assert fsdp / analysis.rough_tutorial_bytes(arch, dp_shape)["dp"] * 2 == pytest.approx(7.65, abs=0.01)


@pytest.mark.parametrize("override,key", [("hardware.gpu=h900", "hardware.gpu"), ("run.measure_step=-1", "run.measure_step")])
def test_bad_measurement_or_hardware_keys_fail_before_any_worker(tmp_path, override, key):
    from tp2d_exp.config.errors import ConfigError
    from tp2d_exp.config.validate import check_config

    job = compose_job(tmp_path, [override], prepare=False)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(job)


def test_mfu_peak_comes_from_the_gpu_table_row_of_the_device_name(tmp_path):
    hw = compose_job(tmp_path, [], prepare=False).hardware
    peak = lambda name: getattr(hw.gpu_for(name), "peak_bf16_tflops", None)  # noqa: E731
    assert peak("NVIDIA H100 80GB HBM3") == 989 and peak("NVIDIA H100 PCIe") == 756
    assert peak("NVIDIA A100-SXM4-40GB") == 312 and peak("NVIDIA A100 80GB PCIe") == 312
    assert peak("NVIDIA GeForce RTX 4090") is None  # not in the table: no MFU rather than a wrong one
