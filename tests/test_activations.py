"""What a decoder layer saves for backward, measured on CPU (tp2d_exp.perf.saved: every tensor the forward
produced that is still alive afterwards, by storage, local shards) against the planner's per-op count
(tp2d_exp.perf.analysis.layer_saved_bytes): the tiny and the Qwen2.5-0.5B layer with real shapes, every
activation checkpointing mode, tp1 and tp2 with sequence parallel off and on. One layer, short sequences."""

from __future__ import annotations

import pytest

from tests.conftest import compose_job, run_distributed
from tp2d_exp.config.parallel_dims import ParallelDims
from tp2d_exp.config.schema import ActivationCheckpointing
from tp2d_exp.perf import analysis

SHAPES = {"tiny": (2, 64), "qwen2_5_0_5b": (1, 128)}  # (micro-batch, sequence length)
CASES = [(name, ac, sp) for name in SHAPES for ac in ActivationCheckpointing for sp in (False, True)]


def _measure_on_tp_ranks(archs: dict, cases: list, tp: int) -> list[int]:
    """On each rank of a tp group: the saved bytes of one freshly built layer per case."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tp2d_exp.perf.saved import build_layer, measure_saved_bytes

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",)) if tp > 1 else None
    out = []
    for name, ac, sp in cases:
        arch, (batch, seq) = archs[name], SHAPES[name]
        layer, rotary = build_layer(arch, mesh, sp, ac)
        out.append(measure_saved_bytes(layer, rotary, batch, seq, arch.hidden_size, tp, sp))
    return out


def _predicted(arch, name: str, ac, sp: bool, tp: int) -> int:
    batch, seq = SHAPES[name]
    shape = analysis.StepShape(ParallelDims(tp=tp, dp=1, sequence_parallel=sp), micro_batch=batch, accumulation=1,
                               seq_length=seq, compute_bytes=4, ac=ac)
    return analysis.layer_saved_bytes(arch, shape)


@pytest.fixture(scope="module")
def archs(tmp_path_factory):
    return {name: compose_job(tmp_path_factory.mktemp(name), [f"model={name}"], prepare=False).arch
            for name in SHAPES}


def test_one_layer_saves_what_the_planner_counts_on_one_rank(archs):
    cases = [c for c in CASES if not c[2]]
    measured = _measure_on_tp_ranks(archs, cases, tp=1)
    for (name, ac, _), got in zip(cases, measured):
        assert _predicted(archs[name], name, ac, False, 1) == pytest.approx(got, rel=0.10), (name, ac)


@pytest.mark.slow  # a pool of 2 gloo ranks (shared with the other parallel tests of a session)
def test_one_layer_saves_what_the_planner_counts_on_tp2_with_and_without_sequence_parallel(archs):
    per_rank = run_distributed(_measure_on_tp_ranks, 2, archs, CASES, 2)
    assert per_rank[0] == per_rank[1]  # every TP rank holds the same share
    for (name, ac, sp), got in zip(CASES, per_rank[0]):
        assert _predicted(archs[name], name, ac, sp, 2) == pytest.approx(got, rel=0.10), (name, ac, sp)
