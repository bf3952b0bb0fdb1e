"""run.plan_only: what a job would cost on a named hardware profile, in seconds and bytes, without any GPU.

The analytic model (tp2d_exp.perf.analysis) gives bytes per collective and the per-rank memory peak; the
time model (tp2d_exp.perf.timing) the compute by shape; the profile (`hardware` config node) gives link
bandwidths, the GPU row and the allocator's overhead. No data is tokenized, no weights are downloaded, Ray is
not started. The plan is printed and written as the job's summary.json (status "planned"), so a plan_only
sweep reads like a real one in scripts/sweep_report.py.

Per step: compute (timing.compute_times per micro-batch, AdamW once); each mesh dim's collectives take
count x latency + wire bytes / bus bandwidth on the link its group spans (TP groups are consecutive ranks,
so NVLink while tp <= gpus_per_node; DP groups span the whole mesh, so InfiniBand once tp*dp >
gpus_per_node). TP collectives sit on the critical path; FSDP2's all-gathers and reduce-scatters overlap
the neighbouring layer's compute and show only where they take longer (fsdp_exposed_seconds):
step = compute + tp + exposed dp. Memory fits when the predicted reserved peak plus the CUDA context fits
the GPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from tp2d_exp.config.parallel_dims import ParallelDims
from tp2d_exp.config.schema import ActivationCheckpointing, HardwareConfig
from tp2d_exp.config.spec import JobSpec
from tp2d_exp.perf import analysis, timing
from tp2d_exp.records import CommReport, CommTotals, Link, MemoryReport, PlanFacts, RunStatus, RunSummary

GiB = 2**30


def link(dim: str, dims: ParallelDims, hw: HardwareConfig) -> Link:
    """The link a mesh dim's groups use: intra-node while the ranks the group spans fit on one node."""
    span = dims.tp if dim == "tp" else dims.world_size
    if span <= hw.gpus_per_node:
        return Link(link="intra_node", gbps=hw.intra_node_gbps, latency_us=hw.intra_node_latency_us)
    return Link(link="inter_node", gbps=hw.inter_node_gbps, latency_us=hw.inter_node_latency_us)


def collective_seconds(kind: str, count: int, message_bytes: float, group_size: int, lk: Link) -> float:
    if group_size == 1:
        return 0.0  # a group of one moves nothing
    return count * (lk.latency_us * 1e-6 + analysis.wire_factor(kind, group_size) * message_bytes / (lk.gbps * 1e9))


def comm_seconds(kinds: dict, group_size: int, lk: Link) -> float:
    """A mesh dim's collectives of one step ({kind: Count}, bytes summed over calls), one after another."""
    return sum(collective_seconds(kind, v.count, v.bytes / v.count, group_size, lk) for kind, v in kinds.items()
               if v.count)


def fsdp_exposed_seconds(spec: JobSpec, shape: analysis.StepShape, times: timing.ComputeTimes, lk: Link) -> float:
    """The part of FSDP2's communication no compute hides, per step. Forward: layer k+1's all-gather runs
    during layer k (the root's and the first layer's have nothing before them). Backward: layer k's re-gather
    and layer k+1's reduce-scatter run during layer k+1's backward (the last layer is not re-gathered; the
    first layer's and the root's reduce-scatters come last). Reduce-scatters run on the last micro-batch only."""
    dp, layers, a = shape.dp, spec.arch.num_hidden_layers, shape.accumulation
    if dp == 1:
        return 0.0
    lp, rp = analysis.layer_params(spec.arch), analysis.root_params(spec.arch, shape.dims.loss_parallel)
    layer_numel = dp * analysis.group_shard_numel(lp, shape.tp, dp)
    root_numel = dp * analysis.group_shard_numel(rp, shape.tp, dp)
    ag = lambda n: collective_seconds("all_gather", 1, n * shape.compute_bytes, dp, lk)  # noqa: E731
    rs = lambda n: collective_seconds("reduce_scatter", 1, n * shape.reduce_bytes, dp, lk)  # noqa: E731
    forward = ag(root_numel) + ag(layer_numel) + (layers - 1) * max(0.0, ag(layer_numel) - times.layer_forward)
    backward = (layers - 1) * max(0.0, ag(layer_numel) - times.layer_backward)
    last = (layers - 1) * max(0.0, ag(layer_numel) + rs(layer_numel) - times.layer_backward) \
        + rs(layer_numel) + rs(root_numel)
    return (a - 1) * (forward + backward) + forward + last


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
    times = timing.compute_times(arch, shape, gpu)
    memory = analysis.predict_memory(arch, shape, hw.allocator_overhead)
    shard = memory.params // analysis.FP32
    compute_s = shape.accumulation * (arch.num_hidden_layers * (times.layer_forward + times.layer_backward)
                                      + times.outer) + timing.optimizer_seconds(shard, gpu)
    fsdp = fsdp_exposed_seconds(spec, shape, times, links["dp"])
    # The dp collectives FSDP2 does not run (loss bookkeeping, gradient norm) wait on the step.
    bookkeeping = sum(collective_seconds(c.kind, c.count, c.bytes, dims.dp, links["dp"]) for c in collectives
                      if c.dim == "dp" and not c.purpose.startswith("fsdp"))
    dp_exposed = fsdp + bookkeeping
    exposed_s = comm_s["tp"] + dp_exposed
    step_s = compute_s + exposed_s
    gbs = spec.resolved.global_batch_size
    tokens = gbs * shape.seq_length
    flops_per_token = analysis.flops_per_token(arch, shape.seq_length)
    tokens_per_s = tokens / step_s
    peak = gpu.peak_bf16_tflops * 1e12
    memory_bytes = gpu.memory_gib * GiB
    return RunSummary.of(
        spec, RunStatus.planned, model=spec.model.name, params=analysis.param_count(arch),
        flops_per_token=flops_per_token,
        comm=CommReport(predicted=per_dim, predicted_bytes=analysis.dim_bytes(per_dim, dims),
                        predicted_collectives=collectives, predicted_time_s=comm_s, links=links,
                        rough_tutorial_bytes=analysis.rough_tutorial_bytes(arch, shape)),
        memory=MemoryReport(predicted=memory, gpu_memory_bytes=memory_bytes,
                            usable_bytes=memory_bytes - hw.cuda_context_gib * GiB,
                            fits=memory.total + hw.cuda_context_gib * GiB <= memory_bytes),
        plan=PlanFacts(hardware=hw.name, gpu=hw.gpu, nodes=math.ceil(dims.world_size / hw.gpus_per_node),
                       compute_time_s=compute_s, tp_exposed_s=comm_s["tp"], dp_time_s=comm_s["dp"],
                       dp_exposed_s=dp_exposed, exposed_comm_s=exposed_s, step_time_s=step_s,
                       comm_share=exposed_s / step_s, tokens_per_s=tokens_per_s,
                       tokens_per_s_per_device=tokens_per_s / dims.world_size,
                       mfu=flops_per_token * tokens_per_s / (dims.world_size * peak),
                       gemm_efficiency=gpu.gemm_efficiency))


# A CPU node of a local run also holds the driver and Ray's own processes beside the workers: measured on this
# repository's machine during a local run (RSS, 2026-12-05): the driver ~0.6 GB, Ray Train's controller and
# its four helper actors ~1.5 GB, dashboard, agents, monitors, GCS and raylet ~0.6 GB.
CPU_DRIVER_BYTES = int(2.5 * 2**30)
# The CPU guard keeps this share of the node's RAM free: the CPU prediction's error measured here reaches 12 %
# (README "Mesh sweeps"), and the page cache, the OS and other users take some. GPUs get no such share: their
# allocator overhead is modelled and the CUDA context counted.
CPU_GUARD_HEADROOM = 0.10


def memory_guard(spec: JobSpec, use_gpu: bool, node_bytes: float, ranks_per_node: int,
                 others_bytes: int = 0) -> Optional[str]:
    """Before launch: one line when the predicted peak will not fit, else None. GPU: a rank's predicted
    reserved peak plus the CUDA context against `node_bytes`, the GPU's memory; CPU: the node's ranks' predicted
    RSS plus `others_bytes` (the driver's and Ray's own processes, where `node_bytes` still counts them)
    against `node_bytes`, the node's RAM. Names the
    levers that alone would make it fit: activation checkpointing, sequence parallel, a larger tp (same
    world size), a smaller micro-batch (gradient accumulation keeps the global batch)."""
    hw = spec.hardware
    shape = analysis.StepShape.of(spec, compute_bytes=2 if use_gpu else analysis.FP32)

    if not use_gpu:
        node_bytes *= 1 - CPU_GUARD_HEADROOM

    def need(s: analysis.StepShape) -> float:
        per_rank = analysis.predict_memory(spec.arch, s, hw.allocator_overhead).total
        return per_rank + hw.cuda_context_gib * GiB if use_gpu else per_rank * ranks_per_node + others_bytes

    if need(shape) <= node_bytes:
        return None
    dims, heads = shape.dims, spec.arch.num_key_value_heads
    options: list[tuple[str, analysis.StepShape]] = []
    for mode in (ActivationCheckpointing.selective, ActivationCheckpointing.full):
        if list(ActivationCheckpointing).index(mode) > list(ActivationCheckpointing).index(shape.ac):
            options.append((f"run.activation_checkpointing={mode}", dataclasses.replace(shape, ac=mode)))
    if dims.tp > 1 and not dims.sequence_parallel:
        options.append(("parallelism.sequence_parallel=true",
                        dataclasses.replace(shape, dims=dataclasses.replace(dims, sequence_parallel=True))))
    if dims.dp % 2 == 0 and heads % (2 * dims.tp) == 0:
        wider = dataclasses.replace(dims, tp=2 * dims.tp, dp=dims.dp // 2)
        options.append((f"parallelism.tp={wider.tp} parallelism.dp={wider.dp}", dataclasses.replace(
            shape, dims=wider, accumulation=shape.accumulation * 2)))
    if shape.micro_batch > 1:
        half = shape.micro_batch // 2
        options.append((f"run.batch_size_per_gpu={half}",
                        dataclasses.replace(shape, micro_batch=half, accumulation=shape.accumulation * 2)))
    levers = [name for name, option in options if need(option) <= node_bytes]
    where = (f"{_gib(need(shape) - hw.cuda_context_gib * GiB)} reserved + {hw.cuda_context_gib:g} GiB CUDA context "
             f"per GPU, {hw.gpu} has {_gib(node_bytes)}" if use_gpu else
             f"{ranks_per_node} ranks x {_gib((need(shape) - others_bytes) / ranks_per_node)}"
             + (f" + {_gib(others_bytes)} for the driver and Ray" if others_bytes else "")
             + f" = {_gib(need(shape))} of RAM, the node has {_gib(node_bytes)} usable "
             f"({1 - CPU_GUARD_HEADROOM:.0%} of its available RAM)")
    fix = ("any one of " + ", ".join(levers) + " would fit it" if levers else
           "none of activation checkpointing, sequence parallel, a larger tp or a smaller batch alone fits it: add "
           "devices (more dp) or nodes")
    return f"predicted peak memory does not fit ({where}): {fix}"


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
        f"  memory per rank at the peak ({m.peak_phase}): params {_gib(m.params)} + grads {_gib(m.grads)} + "
        f"optimizer {_gib(m.optimizer)} + gathered params {_gib(m.gathered_params)} + activations "
        f"{_gib(m.activations)} + loss {_gib(m.loss)} + transient {_gib(m.transient)} = {_gib(m.allocated)} "
        f"allocated, {_gib(m.total)} reserved; with the CUDA context "
        f"{_gib(m.total + mem.gpu_memory_bytes - mem.usable_bytes)} of {_gib(mem.gpu_memory_bytes)} -> "
        + ("fits" if mem.fits else "DOES NOT FIT"),
    ]
    for dim in ("tp", "dp"):
        b = comm.predicted_bytes[dim]
        kinds = ", ".join(f"{k} {v.count}x = {_bytes(v.bytes)}" for k, v in comm.predicted.get(dim, {}).items())
        lines.append(f"  {dim} per step: {_bytes(b.bytes)} messages, {_bytes(b.wire_bytes)} on the wire over "
                     f"{comm.links[dim].link} -> {comm.predicted_time_s[dim] * 1e3:.1f} ms  ({kinds or 'none'})")
    lines.append(f"  step: compute {pl.compute_time_s * 1e3:.1f} ms + exposed TP {pl.tp_exposed_s * 1e3:.1f} ms + "
                 f"exposed DP {pl.dp_exposed_s * 1e3:.1f} ms (of {pl.dp_time_s * 1e3:.1f}) = "
                 f"{pl.step_time_s * 1e3:.1f} ms; {pl.tokens_per_s:.0f} tokens/s ({pl.tokens_per_s_per_device:.0f} "
                 f"per GPU), MFU {pl.mfu:.1%}")
    return "\n".join(lines)
