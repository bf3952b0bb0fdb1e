"""The per-rank training loop: mesh -> model -> data -> step loop -> metrics/checkpoints.

`setup` and `train_step` need only an initialised torch.distributed process group and the job spec, so
tests and benchmarks drive the exact same math over plain gloo processes; tp2d_exp.train.worker is the Ray
Train entry point around them.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from tp2d_exp.checkpoint.manager import CheckpointManager, Progress, Restored, due
from tp2d_exp.config.schedule import crossed
from tp2d_exp.config.spec import JobSpec
from tp2d_exp.data.batch import IGNORE_INDEX, document_positions
from tp2d_exp.data.dataset import Samples, Split, open_samples
from tp2d_exp.data.mixture import Mixture
from tp2d_exp.data.order import BatchOrder
from tp2d_exp.perf.measure import Measurements, StepProbe
from tp2d_exp.records import FailureKind, StepRow, StopRecord
from tp2d_exp.train.evaluate import EvalResult, evaluate
from tp2d_exp.train.faults import FaultInjector, NonFiniteError, check_finite
from tp2d_exp.train.loss import token_loss_sum
from tp2d_exp.train.mesh import Placement, gather_placement
from tp2d_exp.train.optim import build_optimizer, clip_grad_norm_, set_lr
from tp2d_exp.train.parallelize import ParallelOptions, build_parallel_model

log = logging.getLogger("tp2d_exp.worker")


@dataclass
class TrainSetup:
    """Everything one rank trains with."""

    spec: JobSpec
    mesh: Any
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    dataset: Samples
    order: BatchOrder
    placement: Placement  # node of every rank and the (dp, tp) rank grid built from it
    heldout: Optional[Samples] = None  # data.val_fraction's store: evaluated, never trained on

    @property
    def dp_rank(self) -> int:
        """The dp coordinate: the only thing that decides this rank's data slice."""
        return self.mesh["dp"].get_local_rank()


@dataclass
class StepResult:
    loss: float  # token-mean over the global batch, the same on every rank
    grad_norm: float
    tokens: int  # loss-bearing tokens in the global batch


def setup(spec: JobSpec, device: torch.device, node_id: str | None = None) -> TrainSetup:
    """`node_id`: the node this rank runs on (Ray's node id; default the hostname), so TP groups stay
    inside nodes whatever order the ranks came in."""
    rank, world, dims, r = dist.get_rank(), dist.get_world_size(), spec.dims, spec.resolved
    if dims.world_size != world:
        raise RuntimeError(f"tp*dp={dims.world_size} but {world} workers started")
    placement = gather_placement(dims, node_id or socket.gethostname())
    mesh = dims.build_mesh(device.type, placement.grid)
    if (mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()) != placement.coordinate(rank):
        raise RuntimeError(f"rank {rank}: mesh coordinates differ from its place {placement.coordinate(rank)} "
                           f"in the rank grid {placement.grid}")
    # Built on the meta device, TP then FSDP2, then only this rank's shards are allocated and filled.
    model = build_parallel_model(spec.model, spec.arch, mesh, device, spec.run.seed, ParallelOptions.of(spec, device))
    optimizer = build_optimizer(model, spec.run)
    dataset = open_samples(spec)
    if (len(dataset), dataset.digest) != (r.num_samples, r.data_digest):  # the driver's, unless it changed since
        raise RuntimeError(f"the corpus has {len(dataset)} samples (digest {dataset.digest}) here, "
                           f"{r.num_samples} ({r.data_digest}) when the driver prepared it")
    heldout = open_samples(spec, Split.heldout) if r.num_heldout_samples else None
    return TrainSetup(spec, mesh, device, model, optimizer, dataset, BatchOrder.of(spec), placement, heldout)


def evaluate_heldout(t: TrainSetup) -> EvalResult:
    """The held-out loss of the model as it is now (tp2d_exp.train.evaluate), on the first run.eval_samples
    samples of the held-out store."""
    run, data = t.spec.run, t.spec.data
    num = min(run.eval_samples, len(t.heldout)) if run.eval_samples else len(t.heldout)
    return evaluate(t.model, t.heldout, num, run.batch_size_per_gpu, t.mesh["dp"], t.device, data.packing,
                    data.attention_within_documents)


def train_step(t: TrainSetup, epoch: int, start: int) -> StepResult:
    """One optimizer step, at the optimizer's LR, on the global batch at sample `start` of `epoch` (this rank
    takes its dp share)."""
    data = t.spec.data
    micro = [t.dataset.batch(idx, epoch) for idx in t.order.micro_batches(epoch, start, t.dp_rank)]
    dp_group = t.mesh["dp"].get_group()
    # Token-mean over the global batch: each rank divides its token-loss sum by the global count of
    # loss-bearing tokens, so dp gradients must be summed. FSDP2 averages them (a divide factor of 1 needs
    # PREMUL_SUM, which gloo lacks), hence the factor dp.
    # int64: an fp32 count is exact only up to 2**24 tokens per global batch.
    count = torch.stack([(b.labels[:, 1:] != IGNORE_INDEX).sum() for b in micro]).sum().to(t.device, torch.int64)
    dist.all_reduce(count, group=dp_group)
    tokens = max(int(count), 1)  # a batch without loss-bearing tokens has a zero loss, not a NaN one
    scale = t.spec.dims.dp / tokens
    loss_sum = torch.zeros((), device=t.device)
    for i, b in enumerate(micro):
        t.model.set_requires_gradient_sync(i == len(micro) - 1)  # reduce-scatter once per step
        # Padded samples need the attention mask; packed blocks let SDPA take its causal path.
        mask = None if data.packing else b.attention_mask.to(t.device)
        positions = document_positions(b.input_ids, t.dataset.eos_id).to(t.device) \
            if data.attention_within_documents else None
        logits = t.model(input_ids=b.input_ids.to(t.device), attention_mask=mask, position_ids=positions).logits
        with loss_parallel() if isinstance(logits, DTensor) else nullcontext():
            s = token_loss_sum(logits, b.labels.to(t.device))
            # The logits are the micro-batch's largest tensor and backward needs only what the loss saved
            # (its fp32 log-probabilities): drop them first, as torchtitan does (tp2d_exp.perf.analysis).
            del logits
            (s * scale).backward()
        loss_sum += s.detach()
    grad_norm = clip_grad_norm_(t.model.parameters(), t.spec.run.max_grad_norm)
    if math.isfinite(grad_norm):  # a non-finite gradient never reaches the weights (run.nonfinite: stop | skip)
        t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(loss_sum, group=dp_group)
    return StepResult(loss=float(loss_sum) / tokens, grad_norm=grad_norm, tokens=int(count))


class Throughput:
    """Tokens per second over the steps since the last flush. Each sample counts once per DP replica (not
    once per TP rank); useful tokens are the loss-bearing ones (padding excluded)."""

    def __init__(self, tokens_per_step: int, world_size: int):
        self.tokens_per_step, self.world_size = tokens_per_step, world_size
        self.restart()

    def restart(self) -> None:
        self.t0, self.steps, self.useful = time.perf_counter(), 0, 0

    def add(self, useful_tokens: int) -> None:
        self.steps += 1
        self.useful += useful_tokens

    def flush(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t0
        tokens = self.steps * self.tokens_per_step
        out = {"tokens_per_s": tokens / elapsed, "useful_tokens_per_s": self.useful / elapsed,
               "tokens_per_s_per_device": tokens / elapsed / self.world_size, "step_time_s": elapsed / self.steps}
        self.restart()
        return out


class Recorder:
    """Where a rank's account of the job goes: its start, log rows, the first step, the end or a failure.
    tp2d_exp.train.worker's rank-0 recorder writes them (metrics.jsonl, W&B, worker.json); this base, what
    every other rank and the benchmarks use, records nothing. A context manager, so outputs are closed even
    when training raises."""

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def started(self, restored: Optional[Restored], progress: Progress, nothing_left: bool) -> None:
        pass

    def first_step_done(self) -> None:
        pass

    def log(self, row: StepRow) -> None:
        pass

    def finished(self, last_row: Optional[StepRow], measured: Measurements, checkpoint_stalls: list[float],
                 source_passes: Optional[dict[str, float]] = None) -> None:
        pass

    def failed(self, kind: FailureKind, error: str) -> None:
        pass

    def stopped(self, stop: StopRecord) -> None:
        pass


class Interrupts:
    """Reasons to end a start of the worker group early, right after a committed checkpoint, so the next start
    (tp2d_exp.driver.elastic) loses no step. Every rank asks, the same number of times, and gets the same
    answer. tp2d_exp.train.worker's asks Ray (a preemption notice) and the driver (a larger mesh fits again);
    this base, what the tests and benchmarks use, never interrupts."""

    def preempted(self) -> Optional[StopRecord]:
        """Asked after every step: a preemption notice (reason, nodes, deadline; the loop sets the step and the
        time its checkpoint is committed)."""
        return None

    def resize_requested(self) -> bool:
        """Asked at each checkpoint step: whether to stop after this checkpoint for a resize."""
        return False


def source_passes(t: TrainSetup, progress: Progress) -> Optional[dict[str, float]]:
    """A mixture's passes over each source so far (whole epochs, then this epoch's consumed positions)."""
    if not isinstance(t.dataset, Mixture):
        return None
    seen = t.order.order(progress.epoch)[:progress.sample_in_epoch].numpy() if progress.sample_in_epoch else []
    return t.dataset.passes(progress.epoch, seen)


def train_loop(t: TrainSetup, progress: Progress, ckpt: CheckpointManager, recorder: Recorder,
               interrupts: Interrupts = Interrupts()) -> Optional[StopRecord]:
    """Steps from `progress` to the end of the run's schedule (counted in samples, tp2d_exp.config.schedule):
    set the LR, train, guard, evaluate, log, checkpoint. Returns why it stopped early (a checkpoint of the
    stop's step is committed), or None when it ran to the end."""
    spec, rank, schedule = t.spec, dist.get_rank(), t.spec.resolved.schedule
    run, batch = spec.run, t.order.global_batch_size
    faults = FaultInjector.of(run, spec.resolved.output_dir)
    probe = StepProbe(spec, t.mesh, t.model, t.optimizer, t.device)
    window = Throughput(spec.data.seq_length * batch, spec.dims.world_size)
    row: Optional[StepRow] = None
    stop: Optional[StopRecord] = None
    try:
        for epoch, start in t.order.steps(progress.epoch, progress.sample_in_epoch, run.num_epochs):
            if progress.samples_consumed >= schedule.end_samples:
                break
            before = progress.samples_consumed
            set_lr(t.optimizer, schedule.lr(before, batch))
            faults.before_step(progress.step + 1, rank)
            with faults.maybe_nan(t.model, progress.step + 1), probe.step():
                result = train_step(t, epoch, start)
            if probe.steps == 1:
                log.info("first step done")
                recorder.first_step_done()
            progress.advance(t.order, epoch, start, result.tokens)  # a skipped step advances the schedule too
            if not check_finite(progress.step, result.loss, result.grad_norm, run.nonfinite):
                progress.skipped_steps += 1
                log.warning("step %d skipped: non-finite loss %s / grad norm %s (run.nonfinite=skip)",
                            progress.step, result.loss, result.grad_norm)
            window.add(result.tokens)
            last = progress.samples_consumed >= schedule.end_samples or progress.epoch >= run.num_epochs
            save = due(progress, before, schedule.checkpoint_every_samples, last)
            notice = interrupts.preempted()
            if notice and not last:  # a checkpoint now, before the node goes, and the next start goes on from it
                stop, save = replace(notice, step=progress.step), True
            elif save and not last and interrupts.resize_requested():
                stop = StopRecord(reason="resize", step=progress.step, time=0.0)
            evaluate_now = t.heldout is not None and (
                last or crossed(schedule.eval_every_samples, before, progress.samples_consumed))
            if (save or last or evaluate_now or progress.step == 1 or probe.instrumented
                    or crossed(schedule.log_every_samples, before, progress.samples_consumed)):
                row = StepRow(step=progress.step, epoch=epoch, loss=result.loss, grad_norm=result.grad_norm,
                              lr=schedule.lr(progress.samples_consumed, batch),
                              samples_consumed=progress.samples_consumed, skipped_steps=progress.skipped_steps,
                              time=round(time.time(), 3), dp=spec.dims.dp, **window.flush())
                probe.annotate(row)
                if evaluate_now:
                    t0 = time.perf_counter()
                    heldout = evaluate_heldout(t)
                    row.val_loss, row.val_ppl, row.val_tokens = heldout.loss, heldout.ppl, heldout.tokens
                    row.val_time_s = round(time.perf_counter() - t0, 4)
                    window.restart()  # evaluation time is not training throughput
                recorder.log(row)
            if save:  # every checkpoint is reported with the row of the step it holds
                ckpt.save(progress, row)
                window.restart()  # checkpoint time is not training throughput
            else:
                ckpt.poll()
            if stop:
                log.warning("stopping after the checkpoint of step %d (%s)", progress.step, stop.reason)
                break
    except NonFiniteError:  # every rank raises at the same step: commit a save still in flight first
        ckpt.close()
        raise
    ckpt.close()  # an asynchronous save is committed before the loop returns
    if stop:
        stop = replace(stop, time=time.time())
    recorder.finished(row, probe.finish(), ckpt.stalls, source_passes(t, progress) if rank == 0 else None)  # probe.finish on every rank: it gathers per-rank memory
    return stop
