"""Peak RSS per rank while building the model: this project's meta-device build (TP and FSDP2 decided first,
then only local shards allocated and filled) against the tutorial's load-then-shard (the full fp32 model on
every rank, then parallelize_module and fully_shard). CPU, gloo ranks, random init.

    python scripts/bench_memory.py                       # tiny and qwen2_5_0_5b architectures, tp2_dp2
    python scripts/bench_memory.py --models tiny --tp 1 --dp 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tp2d_exp, not an installed one

from tp2d_exp.perf.measure import host_kib, reset_host_peak  # noqa: E402
from tp2d_exp.testing.jobs import ROOT, compose_job  # noqa: E402
from tp2d_exp.testing.local_ranks import run_distributed as spawn  # noqa: E402


def build(model_cfg, arch, tp: int, dp: int, recipe: str) -> dict:
    import torch
    from torch.distributed.tensor import DTensor

    from tp2d_exp.config.parallel_dims import ParallelDims
    from tp2d_exp.train.materialize import build_meta_model, hf_config
    from tp2d_exp.train.parallelize import ParallelOptions, apply_fsdp, apply_tp, build_parallel_model

    mesh = ParallelDims(tp=tp, dp=dp).build_mesh("cpu")
    build_meta_model(model_cfg, arch)  # import the modeling code before measuring
    before = host_kib("VmRSS")
    reset_host_peak()
    if recipe == "meta":
        model = build_parallel_model(model_cfg, arch, mesh, torch.device("cpu"), seed=0, opts=ParallelOptions())
    else:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32,
                                                 attn_implementation=str(model_cfg.attn_implementation))
        apply_tp(model, mesh["tp"], ParallelOptions())
        apply_fsdp(model, mesh["dp"], param_dtype=None)
    params = list(model.parameters())
    return {"peak_growth": (host_kib("VmHWM") - before) * 1024,
            "local": sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4 for p in params),
            "full": sum(p.numel() * 4 for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "qwen2_5_0_5b"])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dp", type=int, default=2)
    args = ap.parse_args()
    mib = 1 / 2**20
    print(f"mesh tp{args.tp}_dp{args.dp}, fp32 parameters, peak RSS growth per rank during the build (max over ranks)")
    print(f"{'model':<14}{'full model':>12}{'local shard':>13}{'meta build':>12}{'load-then-shard':>17}{'ratio':>8}")
    for name in args.models:
        spec = compose_job(ROOT / "outputs" / "bench", [f"model={name}", "model.pretrained=false",
                                                        f"parallelism=tp{args.tp}_dp{args.dp}"], prepare=False)
        peaks = {}
        for recipe in ("meta", "tutorial"):
            ranks = spawn(build, args.tp * args.dp, spec.model, spec.arch, args.tp, args.dp, recipe)
            peaks[recipe] = max(r["peak_growth"] for r in ranks)
        r = ranks[0]
        print(f"{name:<14}{r['full'] * mib:>10.0f}MB{max(x['local'] for x in ranks) * mib:>11.0f}MB"
              f"{peaks['meta'] * mib:>10.0f}MB{peaks['tutorial'] * mib:>15.0f}MB{peaks['tutorial'] / peaks['meta']:>7.1f}x")


if __name__ == "__main__":
    main()
