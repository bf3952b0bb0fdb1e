"""run.plan_only: what a job would cost on a named hardware profile, in seconds and without any GPU.

The analytic model (tp2d_exp.analysis) gives bytes per collective and per-rank memory; the profile
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

import json
import math
from pathlib import Path
from typing import Any

from tp2d_exp import analysis

GiB = 2**30


def link(dim: str, tp: int, dp: int, hw: dict[str, Any]) -> dict[str, Any]:
    """The link a mesh dim's groups use: intra-node while the ranks the group spans fit on one node."""
    span = tp if dim == "tp" else tp * dp
    if span <= hw["gpus_per_node"]:
        return {"link": "intra_node", "gbps": hw["intra_node_gbps"], "latency_us": hw["intra_node_latency_us"]}
    return {"link": "inter_node", "gbps": hw["inter_node_gbps"], "latency_us": hw["inter_node_latency_us"]}


def comm_seconds(kinds: dict[str, dict[str, int]], group_size: int, lk: dict[str, Any]) -> float:
    if group_size == 1:
        return 0.0  # a group of one moves nothing
    return sum(v["count"] * lk["latency_us"] * 1e-6
               + analysis.wire_factor(kind, group_size) * v["bytes"] / (lk["gbps"] * 1e9)
               for kind, v in kinds.items())


def make_plan(cfg: dict[str, Any]) -> dict[str, Any]:
    """The job's summary as plan_only predicts it on `cfg["hardware"]` (bf16 compute, fp32 master weights)."""
    arch, hw, run = cfg["model"], cfg["hardware"], cfg["run"]
    tp, dp = cfg["parallelism"]["tp"], cfg["parallelism"]["dp"]
    micro = run["batch_size_per_gpu"]
    gbs = run["global_batch_size"] or micro * dp
    shape = analysis.step_shape(cfg, accumulation=gbs // (micro * dp), compute_bytes=2)
    collectives = analysis.predict_collectives(arch, shape)
    per_dim = analysis.totals(collectives)
    sizes = {"tp": tp, "dp": dp}
    links = {d: link(d, tp, dp, hw) for d in sizes}
    comm_s = {d: comm_seconds(per_dim.get(d, {}), sizes[d], links[d]) for d in sizes}

    gpu = hw["gpus"][hw["gpu"]]
    tokens = gbs * shape.seq_length
    flops_per_token = analysis.flops_per_token(arch, shape.seq_length)
    compute_s = flops_per_token * tokens / (tp * dp) / (gpu["peak_bf16_tflops"] * 1e12 * hw["assumed_mfu"])
    exposed_s = comm_s["tp"] + max(0.0, comm_s["dp"] - compute_s)
    step_s = compute_s + exposed_s
    memory = analysis.predict_memory(arch, shape)
    usable = gpu["memory_gib"] * GiB * hw["usable_memory_fraction"]
    return {
        "status": "planned", "run_name": cfg["run_name"], "mesh": {"tp": tp, "dp": dp}, "world_size": tp * dp,
        "global_batch_size": gbs, "model": arch["name"], "params": analysis.param_count(arch),
        "flops_per_token": flops_per_token,
        "comm": {"predicted": per_dim, "predicted_bytes": analysis.dim_bytes(per_dim, sizes),
                 "predicted_collectives": [c.__dict__ for c in collectives], "predicted_time_s": comm_s,
                 "links": links, "rough_tutorial_bytes": analysis.rough_tutorial_bytes(arch, shape)},
        "memory": {"predicted": memory, "gpu_memory_bytes": gpu["memory_gib"] * GiB,
                   "usable_bytes": usable, "fits": memory["total"] <= usable},
        "plan": {"hardware": hw["name"], "gpu": hw["gpu"], "nodes": math.ceil(tp * dp / hw["gpus_per_node"]),
                 "assumed_mfu": hw["assumed_mfu"], "compute_time_s": compute_s, "exposed_comm_s": exposed_s, "step_time_s": step_s,
                 "comm_share": exposed_s / step_s, "tokens_per_s": tokens / step_s,
                 "tokens_per_s_per_device": tokens / step_s / (tp * dp),
                 "mfu": hw["assumed_mfu"] * compute_s / step_s},
    }


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def render(p: dict[str, Any]) -> str:
    mesh, mem, comm, pl = p["mesh"], p["memory"], p["comm"], p["plan"]
    m = mem["predicted"]
    lines = [
        f"plan: {p['model']} ({p['params'] / 1e9:.2f}B params) on tp{mesh['tp']}_dp{mesh['dp']}, "
        f"{p['world_size']} x {pl['gpu']} ({pl['nodes']} node(s), profile {pl['hardware']}), "
        f"global batch {p['global_batch_size']}",
        f"  memory per rank: params {_gib(m['params'])} + grads {_gib(m['grads'])} + optimizer "
        f"{_gib(m['optimizer'])} + gathered params {_gib(m['gathered_params'])} + activations (est.) "
        f"{_gib(m['activations'])} = {_gib(m['total'])} of {_gib(mem['usable_bytes'])} usable -> "
        + ("fits" if mem["fits"] else "DOES NOT FIT"),
    ]
    for dim in ("tp", "dp"):
        b = comm["predicted_bytes"][dim]
        kinds = ", ".join(f"{k} {v['count']}x = {_bytes(v['bytes'])}" for k, v in comm["predicted"].get(dim, {}).items())
        lines.append(f"  {dim} per step: {_bytes(b['bytes'])} messages, {_bytes(b['wire_bytes'])} on the wire over "
                     f"{comm['links'][dim]['link']} -> {comm['predicted_time_s'][dim] * 1e3:.1f} ms  ({kinds or 'none'})")
    lines.append(f"  step: compute {pl['compute_time_s'] * 1e3:.1f} ms (at {pl['assumed_mfu']:.0%} MFU) + exposed "
                 f"comm {pl['exposed_comm_s'] * 1e3:.1f} ms = {pl['step_time_s'] * 1e3:.1f} ms; "
                 f"{pl['tokens_per_s']:.0f} tokens/s ({pl['tokens_per_s_per_device']:.0f} per GPU), MFU {pl['mfu']:.1%}")
    return "\n".join(lines)


def plan(cfg: dict[str, Any]) -> float:
    """run.py's plan_only path: validate, predict, print, write summary.json; the objective is the step time."""
    from tp2d_exp.config import architecture, validate

    cfg = {**cfg, "model": architecture(cfg["model"])}
    validate(cfg)
    summary = make_plan(cfg)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(render(summary))
    return summary["plan"]["step_time_s"]
