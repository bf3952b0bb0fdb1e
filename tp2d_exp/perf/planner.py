"""run.plan_only: what a job would cost on a named hardware profile, in seconds and without any GPU.

The analytic model (tp2d_exp.perf.analysis) gives bytes per collective and per-rank memory; the profile
(`hardware` config node) gives link bandwidths and the GPU. No data is tokenized, no weights are downloaded,
Ray is not started. The plan is printed and written as the job's summary.json (status "planned"), so a
plan_only sweep reads like a real one in scripts/sweep_report.py.

Time model, per step: compute = FLOPs / (peak x hardware.assumed_mfu); each mesh dim's collectives take
count x latency + wire bytes / bus bandwidth on the link its group spans (TP groups are consecutive ranks,
so NVLink while tp <= gpus_per_node; DP groups span the whole mesh, so InfiniBand once tp*dp > gpus_per_node).
TP all-reduces sit on the critical path; FSDP2's prefetched all-gathers and reduce-scatters hide behind
compute, so only what exceeds it shows: step = compute + tp + max(0, dp - compute).
"""

from __future__ import annotations

import math

from tp2d_exp.config.parallel_dims import ParallelDims
from tp2d_exp.config.schema import HardwareConfig
from tp2d_exp.config.spec import JobSpec
from tp2d_exp.perf import analysis
from tp2d_exp.records import CommReport, CommTotals, Link, MemoryReport, PlanFacts, RunStatus, RunSummary

GiB = 2**30


def link(dim: str, dims: ParallelDims, hw: HardwareConfig) -> Link:
    """The link a mesh dim's groups use: intra-node while the ranks the group spans fit on one node."""
    span = dims.tp if dim == "tp" else dims.world_size
    if span <= hw.gpus_per_node:
        return Link(link="intra_node", gbps=hw.intra_node_gbps, latency_us=hw.intra_node_latency_us)
    return Link(link="inter_node", gbps=hw.inter_node_gbps, latency_us=hw.inter_node_latency_us)


def comm_seconds(kinds: dict, group_size: int, lk: Link) -> float:
    if group_size == 1:
        return 0.0  # a group of one moves nothing
    return sum(v.count * lk.latency_us * 1e-6 + analysis.wire_factor(kind, group_size) * v.bytes / (lk.gbps * 1e9)
               for kind, v in kinds.items())


def make_plan(spec: JobSpec) -> RunSummary:
    """The job's summary as plan_only predicts it on `spec.hardware` (bf16 compute, fp32 master weights)."""
    arch, hw, dims = spec.arch, spec.hardware, spec.dims
    shape = analysis.StepShape.of(spec, compute_bytes=2)
    collectives = analysis.predict_collectives(arch, shape)
    per_dim: CommTotals = analysis.totals(collectives)
    sizes = {"tp": dims.tp, "dp": dims.dp}
    links = {d: link(d, dims, hw) for d in sizes}
    comm_s = {d: comm_seconds(per_dim.get(d, {}), sizes[d], links[d]) for d in sizes}

    gpu = hw.gpus[hw.gpu]
    gbs = spec.resolved.global_batch_size
    tokens = gbs * shape.seq_length
    flops_per_token = analysis.flops_per_token(arch, shape.seq_length)
    compute_s = flops_per_token * tokens / dims.world_size / (gpu.peak_bf16_tflops * 1e12 * hw.assumed_mfu)
    exposed_s = comm_s["tp"] + max(0.0, comm_s["dp"] - compute_s)
    step_s = compute_s + exposed_s
    memory = analysis.predict_memory(arch, shape)
    usable = gpu.memory_gib * GiB * hw.usable_memory_fraction
    return RunSummary.of(
        spec, RunStatus.planned, model=spec.model.name, params=analysis.param_count(arch),
        flops_per_token=flops_per_token,
        comm=CommReport(predicted=per_dim, predicted_bytes=analysis.dim_bytes(per_dim, dims),
                        predicted_collectives=collectives, predicted_time_s=comm_s, links=links,
                        rough_tutorial_bytes=analysis.rough_tutorial_bytes(arch, shape)),
        memory=MemoryReport(predicted=memory, gpu_memory_bytes=gpu.memory_gib * GiB, usable_bytes=usable,
                            fits=memory.total <= usable),
        plan=PlanFacts(hardware=hw.name, gpu=hw.gpu, nodes=math.ceil(dims.world_size / hw.gpus_per_node),
                       assumed_mfu=hw.assumed_mfu, compute_time_s=compute_s, exposed_comm_s=exposed_s,
                       step_time_s=step_s, comm_share=exposed_s / step_s, tokens_per_s=tokens / step_s,
                       tokens_per_s_per_device=tokens / step_s / dims.world_size,
                       mfu=hw.assumed_mfu * compute_s / step_s))


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def render(p: RunSummary) -> str:
    mem, comm, pl = p.memory, p.comm, p.plan
    m = mem.predicted
    lines = [
        f"plan: {p.model} ({p.params / 1e9:.2f}B params) on {p.mesh_name}, "
        f"{p.world_size} x {pl.gpu} ({pl.nodes} node(s), profile {pl.hardware}), "
        f"global batch {p.global_batch_size}",
        f"  memory per rank: params {_gib(m.params)} + grads {_gib(m.grads)} + optimizer "
        f"{_gib(m.optimizer)} + gathered params {_gib(m.gathered_params)} + activations (est.) "
        f"{_gib(m.activations)} = {_gib(m.total)} of {_gib(mem.usable_bytes)} usable -> "
        + ("fits" if mem.fits else "DOES NOT FIT"),
    ]
    for dim in ("tp", "dp"):
        b = comm.predicted_bytes[dim]
        kinds = ", ".join(f"{k} {v.count}x = {_bytes(v.bytes)}" for k, v in comm.predicted.get(dim, {}).items())
        lines.append(f"  {dim} per step: {_bytes(b.bytes)} messages, {_bytes(b.wire_bytes)} on the wire over "
                     f"{comm.links[dim].link} -> {comm.predicted_time_s[dim] * 1e3:.1f} ms  ({kinds or 'none'})")
    lines.append(f"  step: compute {pl.compute_time_s * 1e3:.1f} ms (at {pl.assumed_mfu:.0%} MFU) + exposed "
                 f"comm {pl.exposed_comm_s * 1e3:.1f} ms = {pl.step_time_s * 1e3:.1f} ms; "
                 f"{pl.tokens_per_s:.0f} tokens/s ({pl.tokens_per_s_per_device:.0f} per GPU), MFU {pl.mfu:.1%}")
    return "\n".join(lines)
