"""Checkpoint saves, synchronous against asynchronous (run.checkpoint_async), side by side in one run: the
training time each save blocks, how long the background write takes, how much slower the steps that overlap
it are, and the extra host memory per rank. CPU, gloo ranks, random init, the project's CheckpointManager and
train_step (the commit protocol included: checksums, commit.json).

    python scripts/bench_checkpoint.py                          # tiny and qwen2_5_0_5b architectures, tp1_dp2
    python scripts/bench_checkpoint.py --models tiny --tp 2 --dp 1 --saves 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tp2d_exp, not an installed one

from tp2d_exp.perf.measure import host_kib, reset_host_peak  # noqa: E402
from tp2d_exp.testing.jobs import ROOT, compose_job  # noqa: E402
from tp2d_exp.testing.local_ranks import run_distributed as spawn  # noqa: E402


def measure(spec, mode: str, saves: int, steps_between: int, out_dir: str) -> dict:
    """On every rank: warm up, then `saves` times: save, train `steps_between` steps (the async write overlaps
    them), wait for the commit. Baseline steps run before the first save."""
    import torch
    import torch.distributed as dist

    from tp2d_exp.checkpoint.manager import CheckpointManager, Progress
    from tp2d_exp.train.loop import setup, train_step

    t = setup(spec, torch.device("cpu"))
    ckpt = CheckpointManager(spec, t.model, t.optimizer, t.order, run_dir=f"{out_dir}/{mode}", hf_config=t.model.config,
                             async_save=mode == "async")
    progress, step_s = Progress(), {"baseline": [], "overlapped": []}

    def step(kind: str | None) -> None:
        t0 = time.perf_counter()
        result = train_step(t, progress.epoch, progress.sample_in_epoch)
        ckpt.poll()  # commits an async save once every rank has written it
        dist.barrier()
        if kind:
            step_s[kind].append(time.perf_counter() - t0)
        progress.advance(t.order, progress.epoch, progress.sample_in_epoch, result.tokens)

    for i in range(2 + steps_between):
        step("baseline" if i >= 2 else None)
    extra_kib, write_s = [], []
    for _ in range(saves):
        dist.barrier()
        before = host_kib("VmRSS")
        reset_host_peak()
        t0 = time.perf_counter()
        ckpt.save(progress, None)
        if ckpt.pending is None:  # synchronous: written and committed already
            write_s.append(time.perf_counter() - t0)
        for _ in range(steps_between):
            step("overlapped" if ckpt.pending else None)
            if ckpt.pending is None and len(write_s) < len(ckpt.stalls):
                write_s.append(time.perf_counter() - t0)
        ckpt.wait()  # a write still running after the steps: its commit counts as a stall too
        if len(write_s) < len(ckpt.stalls):
            write_s.append(time.perf_counter() - t0)
        extra_kib.append(host_kib("VmHWM") - before)
    ckpt.close()
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in t.model.parameters()]
    shard_bytes = sum(p.numel() * p.element_size() * 3 for p in local)  # this rank's params + 2 Adam states
    return {"stalls": ckpt.stalls, "extra_kib": extra_kib, "write_s": write_s, "shard_bytes": shard_bytes,
            "baseline_step_s": statistics.median(step_s["baseline"]),
            "overlapped_step_s": statistics.median(step_s["overlapped"]) if step_s["overlapped"] else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,qwen2_5_0_5b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--saves", type=int, default=2)
    ap.add_argument("--steps-between", type=int, default=3, help="training steps after each save")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir under outputs/bench)")
    args = ap.parse_args()
    world = args.tp * args.dp
    print(f"tp{args.tp}_dp{args.dp} on CPU (gloo), {args.saves} saves each, {args.steps_between} steps after each save")
    print(f"{'model':<14}{'mode':<7}{'state/rank':>11}{'stall/save':>12}{'write':>8}{'extra RSS/rank':>16}"
          f"{'step':>8}{'step while writing':>20}")
    for name in args.models.split(","):
        job = compose_job(ROOT / "outputs" / "bench", [f"model={name}", "model.pretrained=false", "model.name_or_path=null",
                                                       f"parallelism=tp{args.tp}_dp{args.dp}", "data.seq_length=64",
                                                       "run.batch_size_per_gpu=1", "run.global_batch_size=0"])
        base = Path(args.dir) if args.dir else ROOT / "outputs" / "bench"
        base.mkdir(parents=True, exist_ok=True)
        out = tempfile.mkdtemp(prefix="ckpt-", dir=base)
        try:
            for mode in ("sync", "async"):
                ranks = spawn(measure, world, job, mode, args.saves, args.steps_between, out)
                r = max(ranks, key=lambda x: sum(x["stalls"]))  # the slowest rank is what training waits for
                extra = statistics.median(max(x["extra_kib"]) for x in ranks) / 2**20
                overlapped = f"{r['overlapped_step_s']:.3f}s" if r["overlapped_step_s"] else "-"
                print(f"{name:<14}{mode:<7}{r['shard_bytes'] / 2**30:>9.2f}Gi{statistics.mean(r['stalls']):>11.3f}s"
                      f"{statistics.mean(r['write_s']):>7.2f}s{extra:>14.2f}Gi{r['baseline_step_s']:>7.3f}s{overlapped:>20}")
        finally:
            shutil.rmtree(out, ignore_errors=True)
    print("stall/save: training time a save blocks (sync: the whole write and commit; async: staging the state "
          "into CPU memory, plus any wait for the commit). write: from the save to its commit. extra RSS: peak "
          "host memory above the rank's RSS before the save.")


if __name__ == "__main__":
    main()
