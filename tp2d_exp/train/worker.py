"""The Ray Train worker: set up this rank, resume from the newest intact checkpoint if any, train, record.

Ray appears here and in the checkpoint report adapter only; the loop itself (tp2d_exp.train.loop) is Ray-free.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from tp2d_exp.checkpoint.manager import CheckpointManager, Progress, Restored
from tp2d_exp.checkpoint.ray_report import report_checkpoint
from tp2d_exp.config.spec import JobSpec, flat_config
from tp2d_exp.credentials import present
from tp2d_exp.perf.measure import Measurements
from tp2d_exp.records import (EVAL_FILE, RESIZE_REQUEST_FILE, EvalReport, FailureKind, Mesh, PlacementReport,
                              StepRow, StopRecord, to_dict, write_json)
from tp2d_exp.storage import join
from tp2d_exp.train.faults import AttemptRecord, NonFiniteError
from tp2d_exp.train.loop import Interrupts, Recorder, TrainSetup, evaluate_heldout, setup, train_loop
from tp2d_exp.train.tracking import Tracker

log = logging.getLogger("tp2d_exp.worker")


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


class RayInterrupts(Interrupts):
    """Ray's preemption notice and the driver's resize request (tp2d_exp.driver.elastic), asked by every rank.

    The notice is Ray Train's own (ray.train.get_preemption_info: the drain of a node hosting a worker, as
    cloud spot terminations reach Ray, with its deadline), a barrier of all workers that gives every rank the
    same answer. In Ray Train V2 the train function runs in a thread, so a signal handler could not do this.
    The resize request is a file the driver writes into the run dir, which every node sees
    (tp2d_exp.driver.cluster.check_shared_paths); a MAX all-reduce makes the ranks agree on it."""

    def __init__(self, run_dir: str, device: torch.device):
        self.request, self.device = Path(run_dir) / RESIZE_REQUEST_FILE, device

    def preempted(self) -> Optional[StopRecord]:
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return None
        return StopRecord(reason="preempted", step=0, time=0.0, preempted_nodes=info.preempted_node_ids,
                          deadline=info.deadline_ms / 1000 if info.deadline_ms else None)

    def resize_requested(self) -> bool:
        flag = torch.tensor([int(self.request.exists())], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class RankZeroRecorder(Recorder):
    """Rank 0's outputs: metrics.jsonl and W&B (Tracker) plus the attempt record in worker.json that the
    driver merges into summary.json. Use as a context manager: W&B is finished even when training raises."""

    def __init__(self, spec: JobSpec, placement: PlacementReport, attempt: AttemptRecord):
        r = spec.resolved
        self.tracker = Tracker(r.output_dir, spec.logger, r.wandb, r.run_name,
                               {**flat_config(spec), "placement": to_dict(placement)})
        self.attempt, self.resize = attempt, spec.resolved.resize
        self.attempt.report.wandb_dir, self.attempt.report.placement = self.tracker.wandb_dir, placement

    def __exit__(self, *exc) -> None:
        self.tracker.__exit__(*exc)

    def started(self, restored: Optional[Restored], progress: Progress, nothing_left: bool) -> None:
        self.attempt.started(progress.step if restored else None, restored.path if restored else None,
                             nothing_left=nothing_left, resize=self.resize)
        if self.attempt.is_restart or restored:
            self.tracker.summary({"restarts": self.attempt.report.restarts, "resumed_from_step": progress.step})
        if self.resize:  # W&B shows the mesh of every step (dp); the summary lists the resizes
            self.tracker.summary({"resizes": to_dict(self.attempt.report.resizes)})

    def stopped(self, stop: StopRecord) -> None:
        self.attempt.stopped(stop)
        self.tracker.summary({"stopped": to_dict(stop)})

    def first_step_done(self) -> None:
        self.attempt.first_step_done()

    def log(self, row: StepRow) -> None:
        self.tracker.log(row)

    def finished(self, last_row: Optional[StepRow], measured: Measurements, checkpoint_stalls: list[float],
                 source_passes: Optional[dict[str, float]] = None) -> None:
        placement = self.attempt.report.placement
        last = {k: v for k, v in last_row.flat().items() if k != "step"} if last_row else {}
        self.tracker.summary({**last, **to_dict(measured), "placement/num_nodes": placement.num_nodes,
                              "placement/tp_intra_node": placement.tp_intra_node})
        report = self.attempt.report
        report.wandb_dir = self.tracker.wandb_dir  # the offline run's, if one took over mid-run
        report.flops_per_token, report.peak_flops_per_device = measured.flops_per_token, measured.peak_flops_per_device
        report.memory, report.comm = measured.memory, measured.comm
        report.source_passes = source_passes
        if checkpoint_stalls:
            report.checkpoint_stall_s = round(sum(checkpoint_stalls), 4)
            report.checkpoint_stalls_s = [round(s, 4) for s in checkpoint_stalls]
        self.attempt.write()

    def failed(self, kind: FailureKind, error: str) -> None:
        self.attempt.failed(kind, error)


def evaluate_restored(t: TrainSetup, restored: Optional[Restored], output_dir: str) -> None:
    """scripts/evaluate.py's job on the workers: the restored model's held-out loss, into eval.json."""
    if restored is None:  # the driver resolved and checked it, so only a vanished checkpoint gets here
        raise RuntimeError(f"no checkpoint to evaluate was found at {t.spec.resolved.resume_checkpoint}")
    result = evaluate_heldout(t)
    log.info("held-out loss %.6f (ppl %.3f) over %d tokens", result.loss, result.ppl, result.tokens)
    if dist.get_rank() == 0:
        dims = t.spec.dims
        write_json(Path(output_dir) / EVAL_FILE, EvalReport(
            checkpoint=restored.path, step=restored.progress.step, samples_consumed=restored.progress.samples_consumed,
            mesh=Mesh(tp=dims.tp, dp=dims.dp), val_loss=result.loss, val_ppl=result.ppl, val_tokens=result.tokens,
            val_samples=result.samples))


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker. `config` is the train_loop_config of tp2d_exp.driver.launch: the
    frozen job spec the driver built and the handoff of its credentials, all a worker is given."""
    import ray
    import ray.train.torch

    spec, credentials = config["spec"], config["credentials"]
    rank, r = dist.get_rank(), spec.resolved
    _setup_worker_logging(r.output_dir, rank)
    log.info("worker %d/%d started", rank, dist.get_world_size())
    credentials.install()  # before any HF or W&B call
    log.info("credentials: %s", ", ".join(present()) or "none")  # names only, never values
    attempt = AttemptRecord(r.output_dir) if rank == 0 else None
    if attempt:  # recorded first: a worker lost during set-up still makes the next start a restart
        attempt.write()
    t = setup(spec, ray.train.torch.get_device(), node_id=ray.get_runtime_context().get_node_id())
    log.info("model and data ready")
    if rank == 0 and t.placement.warning():
        log.warning("%s", t.placement.warning())

    # The run's own newest intact checkpoint (after a worker fault, or a same-name rerun), else run.resume_from.
    ckpt = CheckpointManager(spec, t.model, t.optimizer, t.order, run_dir=join(r.storage_path, r.run_name),
                             hf_config=t.model.config, on_commit=report_checkpoint,
                             async_save=spec.run.checkpoint_async)
    restored = ckpt.restore(r.resume_checkpoint)
    progress = restored.progress if restored else Progress()
    if restored:
        log.info("resumed from %s at step %d", restored.path, progress.step)
    if r.evaluate_only:
        evaluate_restored(t, restored, r.output_dir)
        return
    recorder = RankZeroRecorder(spec, t.placement.describe(), attempt) if attempt else Recorder()
    try:
        with recorder:  # W&B finishes as failed if training raises
            recorder.started(restored, progress, nothing_left=progress.samples_consumed >= r.schedule.end_samples
                             or progress.epoch >= spec.run.num_epochs)
            stop = train_loop(t, progress, ckpt, recorder, RayInterrupts(r.output_dir, t.device))
            if stop:
                recorder.stopped(stop)
    except NonFiniteError as e:
        # Every rank raises at the same step (the loss and grad norm are global). Ending the worker cleanly
        # rather than raising keeps Ray from retrying a deterministic failure; the driver reads worker.json.
        log.error("%s", e)
        recorder.failed(FailureKind.nonfinite, f"NonFiniteError: {e}")
