"""Useful tokens/s of this project's defaults against the tutorial recipe, and the project loop's overhead.

1. Tutorial vs project, interleaved in one set of gloo ranks (no Ray; it adds nothing per step): the same
   tiny model, mesh and corpus. The tutorial recipe pads every line to seq_length, takes each rank's own
   token mean as the loss, keeps lm_head and the logits whole on every TP rank and runs AdamW with
   foreach=False. The project's defaults pack documents into seq_length blocks, divide by the global token
   count, shard lm_head and the cross-entropy over the vocabulary (loss parallel) and run foreach AdamW.
   Rounds alternate the two so that machine noise hits both; useful tokens are the loss-bearing ones.
2. Overhead: the steady-state step time of the project's loop against a bare loop of the same math (same
   model build and batches, nothing around it), measured before and after: first the loop alone
   (tp2d_exp.train.loop.train_loop on gloo ranks: metrics, probes, fault hooks, metrics.jsonl; no Ray, no W&B),
   then the whole stack (`run.py`: Hydra, Ray Train, W&B offline).

    python scripts/bench_vs_tutorial.py                     # tp2_dp2, wikitext-2 valid, seq 512
    python scripts/bench_vs_tutorial.py --rounds 3 --skip-overhead
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tp2d_exp, not an installed one

from tp2d_exp.testing.jobs import ROOT, compose_job  # noqa: E402
from tp2d_exp.testing.local_ranks import run_distributed as spawn  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def tutorial_step(job, epoch: int, start: int) -> None:
    """The tutorial's step: HF-style mean over this rank's tokens (FSDP2 then averages the ranks' means)."""
    import torch.nn.functional as F

    from tp2d_exp.data.batch import IGNORE_INDEX

    for idx in job.order.micro_batches(epoch, start, job.dp_rank):
        b = job.dataset.batch(idx)
        logits = job.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b.labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)
        loss.backward()
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)


def useful_tokens(job, epoch: int, start: int) -> int:
    """Loss-bearing tokens of one global batch (what both recipes learn from)."""
    from tp2d_exp.data.batch import IGNORE_INDEX

    labels = job.dataset.batch(job.order.global_batch(epoch, start)).labels
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def interleaved(jobs: dict, warmup: int, rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """On every rank: set up both recipes, then alternate `steps`-step blocks of each for `rounds` rounds."""
    import torch
    import torch.distributed as dist

    from tp2d_exp.train.loop import setup, train_step

    built = {name: setup(spec, torch.device("cpu")) for name, spec in jobs.items()}
    tutorial, run = built["tutorial"], jobs["tutorial"].run
    # The tutorial's optimizer: the same AdamW hyper-parameters, foreach off.
    tutorial.optimizer = torch.optim.AdamW(tutorial.model.parameters(), lr=run.learning_rate,
                                           weight_decay=run.weight_decay, foreach=False)
    run_step = {"tutorial": tutorial_step, "project": train_step}
    position = {name: 0 for name in built}
    out = {name: {"seconds": 0.0, "tokens": 0, "useful": 0, "steps": 0} for name in built}

    def block(name: str, n: int, timed: bool) -> None:
        job = built[name]
        steps = [(position[name] + i) % job.order.steps_per_epoch * job.order.global_batch_size for i in range(n)]
        position[name] += n
        dist.barrier()
        t0 = time.perf_counter()
        for start in steps:
            run_step[name](job, 0, start)
        dist.barrier()
        if timed:  # counting useful tokens is bookkeeping, outside the timed region
            out[name]["seconds"] += time.perf_counter() - t0
            out[name]["useful"] += sum(useful_tokens(job, 0, start) for start in steps)
            out[name]["tokens"] += n * job.order.global_batch_size * job.spec.data.seq_length
            out[name]["steps"] += n

    for name in built:
        block(name, warmup, timed=False)
    for r in range(rounds):
        for name in (built if r % 2 == 0 else reversed(list(built))):
            block(name, steps, timed=True)
    return out


def bare_loop(spec, warmup: int, steps: int) -> float:
    """Seconds per step of the project's math with nothing around it: meta build + TP + FSDP2, packed
    batches in the global order, global token-mean loss, clip, foreach AdamW."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from tp2d_exp.data.batch import IGNORE_INDEX
    from tp2d_exp.data.dataset import open_samples
    from tp2d_exp.data.order import BatchOrder
    from tp2d_exp.train.optim import build_optimizer, clip_grad_norm_
    from tp2d_exp.train.parallelize import ParallelOptions, build_parallel_model

    run, dp = spec.run, spec.dims.dp
    mesh = spec.dims.build_mesh("cpu")
    model = build_parallel_model(spec.model, spec.arch, mesh, torch.device("cpu"), run.seed,
                                 ParallelOptions.of(spec, torch.device("cpu")))
    optimizer = build_optimizer(model, run)
    data = open_samples(spec)
    plan = BatchOrder.of(spec)
    dp_rank, dp_group = mesh["dp"].get_local_rank(), mesh["dp"].get_group()
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            t0 = time.perf_counter()
        (idx,) = plan.micro_batches(0, step % plan.steps_per_epoch * plan.global_batch_size, dp_rank)
        b = data.batch(idx)
        count = (b.labels[:, 1:] != IGNORE_INDEX).sum().float()
        dist.all_reduce(count, group=dp_group)
        logits = model(input_ids=b.input_ids).logits
        with loss_parallel():
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b.labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            (loss * (dp / count)).backward()
        clip_grad_norm_(model.parameters(), run.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if isinstance(loss, DTensor):
            loss = loss.full_tensor()
        dist.all_reduce(loss.detach(), group=dp_group)
    dist.barrier()
    return (time.perf_counter() - t0) / steps


def steady_step_time(metrics: Path) -> tuple[float, int]:
    """Mean seconds per step over the logged windows after step 5 (the loop itself leaves instrumented and
    checkpoint time out of its windows)."""
    from tp2d_exp.records import read_rows

    steady = [r for r in read_rows(metrics) if r.step > 5 and r.step % 5 == 0 and not r.instrumented]
    if not steady:
        raise RuntimeError(f"no steady-state rows in {metrics}; raise --overhead-steps")
    return statistics.fmean(r.step_time_s for r in steady), len(steady) * 5


def project_loop(spec, out_dir: str) -> None:
    """The loop the Ray workers run (tp2d_exp.train.loop.train_loop with rank 0's recorder: metrics.jsonl,
    worker.json; W&B off), on gloo ranks; its checkpoints are written as usual but reported to no Ray run."""
    import torch
    import torch.distributed as dist

    from tp2d_exp.checkpoint.manager import CheckpointManager, Progress
    from tp2d_exp.train.loop import Recorder, setup, train_loop
    from tp2d_exp.train.faults import AttemptRecord
    from tp2d_exp.train.worker import RankZeroRecorder

    spec = spec.with_resolved(output_dir=out_dir, wandb=None)
    t = setup(spec, torch.device("cpu"))
    ckpt = CheckpointManager(spec, t.model, t.optimizer, t.order, run_dir=os.path.join(out_dir, "ckpt"),
                             hf_config=t.model.config)
    recorder = RankZeroRecorder(spec, t.placement.describe(), AttemptRecord(out_dir)) if dist.get_rank() == 0 \
        else Recorder()
    with recorder:
        train_loop(t, Progress(), ckpt, recorder)


def project_run(overrides: list[str], steps: int, out_dir: Path) -> tuple[float, int]:
    """`run.py` through Hydra + Ray + W&B offline; its steady-state seconds per step from metrics.jsonl
    (windows after the first 5 steps, instrumented and checkpoint steps excluded by the loop itself)."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / "run.py"), *overrides, f"run.max_steps={steps}", "run.log_interval=5",
           f"hydra.run.dir={out_dir}"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return steady_step_time(out_dir / "metrics.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="a .txt corpus, one document per line")
    ap.add_argument("--parallelism", default="tp2_dp2")
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--batch-size-per-gpu", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per recipe")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="steps per recipe and round")
    ap.add_argument("--overhead-steps", type=int, default=40, help="steps of the run.py run")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-tutorial", action="store_true")
    args = ap.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"--data {args.data} does not exist; pass a .txt corpus (e.g. wikitext-2 valid.txt)")

    common = [f"parallelism={args.parallelism}", "data=text_files", f"data.path={args.data}",
              f"data.seq_length={args.seq_length}", f"run.batch_size_per_gpu={args.batch_size_per_gpu}",
              "run.global_batch_size=0", "run.measure_step=0"]
    bench = ROOT / "outputs" / "bench"
    jobs = {"tutorial": compose_job(bench, [*common, "data.packing=false", "parallelism.loss_parallel=false"]),
            "project": compose_job(bench, common)}
    world = jobs["project"].dims.world_size
    if not args.skip_tutorial:
        tutorial_vs_project(jobs, world, args)
    if not args.skip_overhead:
        overhead(common, world, args)


def tutorial_vs_project(jobs: dict, world: int, args: argparse.Namespace) -> None:
    print(f"tiny model, {args.parallelism}, {Path(args.data).name}, seq {args.seq_length}, "
          f"{args.batch_size_per_gpu} samples per rank, {args.rounds} alternating rounds x {args.steps} steps")
    res = spawn(interleaved, world, jobs, args.warmup, args.rounds, args.steps)[0]
    print(f"{'recipe':<10}{'steps':>6}{'s/step':>9}{'tokens/s':>11}{'useful tok/s':>14}{'useful share':>14}")
    for name, r in res.items():
        print(f"{name:<10}{r['steps']:>6}{r['seconds'] / r['steps']:>9.3f}{r['tokens'] / r['seconds']:>11.1f}"
              f"{r['useful'] / r['seconds']:>14.1f}{r['useful'] / r['tokens']:>13.1%}")
    speedup = (res["project"]["useful"] / res["project"]["seconds"]) / (res["tutorial"]["useful"] / res["tutorial"]["seconds"])
    print(f"useful tokens/s, project / tutorial: {speedup:.2f}x (target >= 4x)")


def overhead(common: list[str], world: int, args: argparse.Namespace) -> None:
    # The project's own defaults for the loop (measured step 2, profiled steps 3-4), a fixed step count.
    overrides = [o for o in common if o != "run.measure_step=0"]
    job = compose_job(ROOT / "outputs" / "bench", [*overrides, f"run.max_steps={args.overhead_steps}"])
    out = ROOT / "outputs" / "bench" / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    bare = [spawn(bare_loop, world, job, args.warmup + 3, args.overhead_steps // 2)[0]]
    spawn(project_loop, world, job, str(out / "loop"))
    loop, n_loop = steady_step_time(out / "loop" / "metrics.jsonl")
    bare.append(spawn(bare_loop, world, job, args.warmup + 3, args.overhead_steps // 2)[0])
    stack, n_stack = project_run(overrides, args.overhead_steps, out / "run")
    bare.append(spawn(bare_loop, world, job, args.warmup + 3, args.overhead_steps // 2)[0])
    print(f"bare loop s/step, measured before, between and after: {', '.join(f'{b:.3f}' for b in bare)}")
    print(f"project loop (train_loop, metrics.jsonl, no Ray/W&B) {loop:.3f} s/step over {n_loop} steady steps: "
          f"{loop / statistics.fmean(bare[:2]):.3f}x the bare loop (target <= 1.05x)")
    print(f"whole stack (run.py: Hydra + Ray Train + W&B offline) {stack:.3f} s/step over {n_stack} steady steps: "
          f"{stack / statistics.fmean(bare[1:]):.3f}x the bare loop")


if __name__ == "__main__":
    main()
