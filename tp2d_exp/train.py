"""The per-worker training loop: mesh -> model -> data -> step loop -> metrics/checkpoints.

`train_worker` is the Ray Train entry point; `setup` and `train_step` need only an initialised
torch.distributed process group, so tests drive the exact same math over plain gloo processes.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from tp2d_exp import checkpoint
from tp2d_exp.data import IGNORE_INDEX, BatchPlan, TokenizedDataset, document_positions, prepare_dataset
from tp2d_exp.faults import AttemptRecord, FaultInjector, NonFiniteError, check_finite
from tp2d_exp.measure import StepProbe
from tp2d_exp.mesh import ParallelDims, Placement, gather_placement
from tp2d_exp.model import ParallelOptions, build_parallel_model
from tp2d_exp.optim import build_optimizer, build_scheduler, clip_grad_norm_
from tp2d_exp.tracking import Tracker

log = logging.getLogger("tp2d_exp.worker")


@dataclass
class Job:
    """Everything one rank trains with."""

    dims: ParallelDims
    mesh: Any
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: TokenizedDataset
    plan: BatchPlan
    use_mask: bool  # padded samples need the attention mask; packed blocks let SDPA take the causal path
    within_documents: bool  # packed blocks: attention stays inside each document (position ids per document)
    max_grad_norm: float
    placement: Placement  # node of every rank and the (dp, tp) rank grid built from it

    @property
    def dp_rank(self) -> int:
        """The dp coordinate: the only thing that decides this rank's data slice."""
        return self.mesh["dp"].get_local_rank()


@dataclass
class StepResult:
    loss: float  # token-mean over the global batch, the same on every rank
    grad_norm: float
    tokens: int  # loss-bearing tokens in the global batch


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over loss-bearing positions. Vocab-sharded logits (loss parallel, a
    DTensor) need this and its backward inside `loss_parallel()`."""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def setup(cfg: dict[str, Any], device: torch.device, node_id: str | None = None) -> Job:
    """`node_id`: the node this rank runs on (Ray's node id; default the hostname), so TP groups stay
    inside nodes whatever order the ranks came in."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims(tp=cfg["parallelism"]["tp"], dp=cfg["parallelism"]["dp"])
    if dims.world_size != world:
        raise RuntimeError(f"tp*dp={dims.world_size} but {world} workers started")
    placement = gather_placement(dims, node_id or socket.gethostname())
    mesh = dims.build_mesh(device.type, placement.grid)
    if (mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()) != placement.coordinate(rank):
        raise RuntimeError(f"rank {rank}: mesh coordinates differ from its place {placement.coordinate(rank)} "
                           f"in the rank grid {placement.grid}")
    run = cfg["run"]

    # Built on the meta device, TP then FSDP2, then only this rank's shards are allocated and filled.
    model = build_parallel_model(cfg["model"], mesh, device, run["seed"], ParallelOptions.from_config(cfg, device))
    optimizer = build_optimizer(model, run)
    dataset = prepare_dataset(cfg["data"], cfg["tokenizer_dir"], cfg["cache_dir"])
    plan = BatchPlan(num_samples=len(dataset), global_batch_size=cfg["global_batch_size"],
                     micro_batch_size=run["batch_size_per_gpu"], dp=dims.dp, seed=run["seed"])
    return Job(dims, mesh, device, model, optimizer, build_scheduler(optimizer, run, cfg["total_steps"]),
               dataset, plan, use_mask=not cfg["data"]["packing"],
               within_documents=cfg["data"]["attention_within_documents"], max_grad_norm=run["max_grad_norm"],
               placement=placement)


def train_step(job: Job, epoch: int, step_in_epoch: int) -> StepResult:
    """One optimizer step on global batch `step_in_epoch` of `epoch` (this rank takes its dp share)."""
    micro = [job.dataset.batch(idx) for idx in job.plan.micro_batches(epoch, step_in_epoch, job.dp_rank)]
    dp_group = job.mesh["dp"].get_group()
    # Token-mean over the global batch: each rank divides its token-loss sum by the global count of
    # loss-bearing tokens, so dp gradients must be summed. FSDP2 averages them (a divide factor of 1 needs
    # PREMUL_SUM, which gloo lacks), hence the factor dp.
    count = torch.stack([(b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro]).sum().float().to(job.device)
    dist.all_reduce(count, group=dp_group)
    loss_sum = torch.zeros((), device=job.device)
    for i, b in enumerate(micro):
        job.model.set_requires_gradient_sync(i == len(micro) - 1)  # reduce-scatter once per step
        mask = b["attention_mask"].to(job.device) if job.use_mask else None
        positions = document_positions(b["input_ids"], job.dataset.eos_id).to(job.device) \
            if job.within_documents else None
        logits = job.model(input_ids=b["input_ids"].to(job.device), attention_mask=mask, position_ids=positions).logits
        with loss_parallel() if isinstance(logits, DTensor) else nullcontext():
            s = token_loss_sum(logits, b["labels"].to(job.device))
            (s * (job.dims.dp / count)).backward()
        loss_sum += s.detach()
    grad_norm = clip_grad_norm_(job.model.parameters(), job.max_grad_norm)
    if math.isfinite(grad_norm):  # a non-finite gradient never reaches the weights (run.nonfinite: stop | skip)
        job.optimizer.step()
        job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(loss_sum, group=dp_group)
    return StepResult(loss=float(loss_sum / count), grad_norm=grad_norm, tokens=int(count))


def _setup_worker_logging(output_dir: str, rank: int) -> None:
    """Each rank's Python logs and warnings go to the run dir, not the console."""
    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


class Reporter:
    """Rank 0's outputs: metrics.jsonl and W&B (tracking.Tracker) plus the attempt record in worker.json that
    the driver merges into summary.json. On other ranks every method does nothing. Use as a context
    manager: W&B is finished even when training raises."""

    def __init__(self, cfg: dict[str, Any], rank: int, placement: dict[str, Any]):
        self.active = rank == 0
        self.placement = placement
        if self.active:
            self.tracker = Tracker(cfg["output_dir"], cfg["logger"], cfg["run_name"], {**cfg, "placement": placement})
            self.attempt = AttemptRecord(cfg["output_dir"])

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.tracker.__exit__(*exc)

    def started(self, restored: checkpoint.Restored | None, state: checkpoint.TrainState) -> None:
        if not self.active:
            return
        self.attempt.started(state.step if restored else None, restored.path if restored else None,
                             wandb_dir=self.tracker.wandb_dir, placement=self.placement)
        if self.attempt.is_restart or restored:
            self.tracker.summary({"restarts": self.attempt.data["restarts"], "resumed_from_step": state.step})

    def first_step_done(self) -> None:
        log.info("first step done")
        if self.active:
            self.attempt.first_step_done()

    def log(self, row: dict[str, Any]) -> None:
        if self.active:
            self.tracker.log(row)

    def finished(self, last_row: dict[str, Any], measured: dict[str, Any]) -> None:
        if self.active:
            self.tracker.summary({**{k: v for k, v in last_row.items() if k != "step"}, **measured,
                                  "placement/num_nodes": self.placement["num_nodes"],
                                  "placement/tp_intra_node": self.placement["tp_intra_node"]})
            self.attempt.record(**measured)

    def failed(self, error: str) -> None:
        if self.active:
            self.attempt.failed(error)


def train_worker(cfg: dict[str, Any]) -> None:
    """Ray Train worker: set up, resume from the newest intact checkpoint if any, train, report."""
    import ray.train

    rank = dist.get_rank()
    _setup_worker_logging(cfg["output_dir"], rank)
    log.info("worker %d/%d started", rank, dist.get_world_size())
    job = setup(cfg, ray.train.torch.get_device(), node_id=ray.get_runtime_context().get_node_id())
    log.info("model and data ready")
    if rank == 0 and job.placement.warning():
        log.warning("%s", job.placement.warning())

    # The run's own newest intact checkpoint (after a worker fault, or a same-name rerun), else run.resume_from.
    ckpt = checkpoint.CheckpointManager(job.model, job.optimizer, job.scheduler, job.plan,
                                        run_dir=os.path.join(cfg["storage_path"], cfg["run_name"]),
                                        hf_config=job.model.config, tokenizer_dir=cfg["tokenizer_dir"])
    restored = ckpt.restore(cfg["resume_checkpoint"])
    state = restored.state if restored else checkpoint.TrainState()
    if restored:
        log.info("resumed from %s at step %d", restored.path, state.step)
    report = Reporter(cfg, rank, job.placement.describe())
    try:
        with report:  # W&B finishes as failed if training raises
            report.started(restored, state)
            train_loop(job, cfg, state, ckpt, report)
    except NonFiniteError as e:
        # Every rank raises at the same step (the loss and grad norm are global). Ending the worker cleanly
        # rather than raising keeps Ray from retrying a deterministic failure; the driver reads worker.json.
        log.error("%s", e)
        report.failed(f"NonFiniteError: {e}")


def train_loop(job: Job, cfg: dict[str, Any], state: checkpoint.TrainState, ckpt: checkpoint.CheckpointManager,
               report: Reporter) -> None:
    """Steps from `state` to the run's last step: train, guard, log, checkpoint."""
    run, total_steps, rank = cfg["run"], cfg["total_steps"], dist.get_rank()
    faults = FaultInjector.from_config(run, cfg["output_dir"])
    probe = StepProbe(cfg, job.mesh, job.model, job.optimizer, job.plan.accumulation_steps, job.device)
    window = Throughput(cfg["data"]["seq_length"] * job.plan.global_batch_size, job.dims.world_size)
    row: dict[str, Any] = {}
    for epoch, step_in_epoch in job.plan.steps(state.epoch, state.step_in_epoch, run["num_epochs"]):
        if state.step >= total_steps:
            break
        faults.before_step(state.step + 1, rank)
        with faults.maybe_nan(job.model, state.step + 1), probe.step():
            result = train_step(job, epoch, step_in_epoch)
        if probe.steps == 1:
            report.first_step_done()
        state.advance(job.plan, epoch, step_in_epoch, result.tokens)
        if not check_finite(state.step, result.loss, result.grad_norm, run["nonfinite"]):
            state.skipped_steps += 1
            log.warning("step %d skipped: non-finite loss %s / grad norm %s (run.nonfinite=skip)",
                        state.step, result.loss, result.grad_norm)
        window.add(result.tokens)
        done = state.step >= total_steps
        if state.step % run["log_interval"] == 0 or state.step == 1 or done or probe.instrumented:
            row = {"step": state.step, "epoch": epoch, "loss": result.loss, "lr": job.scheduler.get_last_lr()[0],
                   "grad_norm": result.grad_norm, "samples_consumed": state.samples_consumed,
                   "skipped_steps": state.skipped_steps, **window.flush()}
            row.update(probe.metrics(row["tokens_per_s"]))
            report.log(row)
        if checkpoint.due(state, run["checkpoint_every"], total_steps):
            ckpt.save(state, row)
            window.restart()  # checkpoint time is not training throughput
    report.finished(row, probe.finish())  # probe.finish on every rank: it gathers per-rank memory


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
               "tokens_per_s_per_device": tokens / elapsed / self.world_size,
               "step_time_s": elapsed / self.steps}
        self.restart()
        return out
