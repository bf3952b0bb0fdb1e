"""Measured communication and memory equal the analytic model, on real gloo process groups.

Every preset mesh of up to 4 workers runs a few real train steps under tp2d_exp.perf.measure.StepProbe (the code
the Ray workers run); the collectives counted on the measured step must equal tp2d_exp.perf.analysis's prediction
count for count and byte for byte, per collective kind and mesh dim, and each rank's shards of parameters,
gradients and optimizer state must match the predicted per-rank bytes.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_job, run_distributed
from tp2d_exp.records import StateBytes

# Micro-batches of 1 without accumulation, except tp2_dp2, which accumulates 2 micro-batches per step
# (all-gathers repeat, the reduce-scatter does not), unties lm_head from the embedding and runs the profiler
# on a second step. Loss parallel is the default; the TP cases cover each combination of the TP options.
# Collectives are counted on step 1.
CASES = {
    1: {"tp1_dp1": []},
    2: {"tp1_dp2": [], "tp2_dp1_sp": ["parallelism.sequence_parallel=true"],
        "tp2_dp1_plain": ["parallelism.loss_parallel=false"],
        # checkpointing's recomputation repeats the forward collectives it cannot take from the saved set
        "tp2_dp1_sp_selective": ["parallelism.sequence_parallel=true", "run.activation_checkpointing=selective"],
        "tp2_dp1_full": ["run.activation_checkpointing=full"]},
    4: {"tp1_dp4": [], "tp4_dp1_sp_nolp": ["parallelism.sequence_parallel=true", "parallelism.loss_parallel=false"],
        "tp2_dp2": ["run.global_batch_size=4", "run.profile_steps=1", "model.tie_word_embeddings=false"]},
}
OVERRIDES = ["run.batch_size_per_gpu=1", "run.global_batch_size=0", "data.seq_length=32", "run.measure_step=1",
             "run.profile_steps=0"]


def mesh_of(case: str) -> tuple[int, int]:
    tp, dp = case.split("_")[:2]
    return int(tp[2:]), int(dp[2:])


def probe_meshes(jobs: list) -> list[dict]:
    from tp2d_exp.perf.measure import StepProbe
    from tp2d_exp.records import StepRow
    from tp2d_exp.train.loop import setup, train_step

    out = []
    for job in jobs:
        j = setup(job, torch.device("cpu"))
        probe = StepProbe(job, j.mesh, j.model, j.optimizer, j.device)
        rows = []
        for step in range(1 + job.run.profile_steps):
            with probe.step():
                train_step(j, 0, step * j.order.global_batch_size)
            row = StepRow(step=step + 1, epoch=0, loss=0.0, lr=0.0, grad_norm=0.0, samples_consumed=0, skipped_steps=0,
                          tokens_per_s=1000.0, useful_tokens_per_s=1000.0, tokens_per_s_per_device=250.0,
                          step_time_s=1.0)
            probe.annotate(row)
            rows.append(row)
        out.append({"rows": rows, "accumulation": job.accumulation_steps, "measured": probe.finish()})
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, list[dict]]:
    """{case: [rank 0's result, rank 1's, ...]}, one call per world size."""
    results = {}
    for world, cases in CASES.items():
        jobs = [compose_job(tmp_path_factory.mktemp(case), [f"parallelism=tp{tp}_dp{dp}", *OVERRIDES, *extra])
                for case, extra in cases.items() for tp, dp in [mesh_of(case)]]
        per_rank = run_distributed(probe_meshes, world, jobs)
        for i, case in enumerate(cases):
            results[case] = [rank[i] for rank in per_rank]
    return results


MESH_IDS = [case for cases in CASES.values() for case in cases]


@pytest.mark.parametrize("mesh", MESH_IDS)
def test_measured_collectives_equal_prediction(measured, mesh):
    for rank in measured[mesh]:
        comm = rank["measured"].comm
        assert comm.measured == comm.predicted, (comm.measured, comm.predicted)
        assert comm.matches_prediction is True
    comm = measured[mesh][0]["measured"].comm
    tp, dp = mesh_of(mesh)
    accumulation = measured[mesh][0]["accumulation"]
    # What the mesh implies, independent of the model's arithmetic: TP traffic only with tp > 1, FSDP only
    # with dp > 1, all-gathers repeat per micro-batch, reduce-scatters happen once per step.
    assert ("tp" in comm.measured) == (tp > 1)
    assert ("all_gather" in comm.measured.get("dp", {})) == (dp > 1)
    if mesh == "tp2_dp1_plain":  # 7 per layer (2 forward, 5 backward) x 4 layers, + the grad norm
        assert comm.measured["tp"]["all_reduce"].count == 7 * 4 + 1
    if "_sp" in mesh:  # sequence parallel: a reduce-scatter per row-parallel output, no forward all-reduce
        assert comm.measured["tp"]["reduce_scatter"].count >= 2 * 4
    if dp > 1:
        assert comm.measured["dp"]["all_gather"].count == (1 + 4 + 3) * accumulation
        assert comm.measured["dp"]["reduce_scatter"].count == 1 + 4


@pytest.mark.parametrize("mesh", MESH_IDS)
def test_state_memory_equals_prediction(measured, mesh):
    for rank in measured[mesh]:
        memory = rank["measured"].memory
        predicted, state = memory.predicted, memory.state_bytes_per_rank[0]
        assert state == StateBytes(params=predicted.params, grads=predicted.grads, optimizer=predicted.optimizer)
        assert memory.peak_bytes > 0 and memory.peak_source == "process_peak_rss"


def test_instrumented_steps_are_flagged_and_timed(measured):
    assert measured["tp2_dp2"][0]["accumulation"] == 2
    rows = measured["tp2_dp2"][0]["rows"]
    assert [r.instrumented for r in rows] == [True, True]
    assert rows[0].comm["tp_bytes"] == rows[0].comm["tp_bytes_predicted"] > 0
    assert rows[0].comm["matches_prediction"] is True
    profile = measured["tp2_dp2"][0]["measured"].comm.profile
    assert profile.steps == 1 and 0 < profile.exposed_comm_s < profile.step_time_s
    assert rows[1].comm["comm_share"] == pytest.approx(profile.exposed_comm_s / profile.step_time_s)
    assert rows[0].mfu is None  # no peak FLOPs on CPU
