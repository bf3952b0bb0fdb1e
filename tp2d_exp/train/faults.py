"""Faults and what the run does about them: injected worker faults (test-only), the non-finite guard, and the
record of attempts and restarts (worker.json, merged into summary.json) that W&B shows too.

Worker faults are retried by Ray (FailureConfig(max_failures)): the worker group restarts and resumes from
the newest intact checkpoint. A non-finite loss or gradient norm is deterministic, so retrying it would only
repeat it: `run.nonfinite=stop` ends the run as failed without a retry (every rank sees the same global
numbers, so every rank stops at the same step); `skip` drops that step's update and goes on.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import torch.nn as nn

from tp2d_exp.config.schema import FaultMode, NonFinite, RunConfig
from tp2d_exp.records import (WORKER_FILE, FailureKind, FaultRecord, ResizeRecord, RestartRecord, StopRecord,
                              WorkerReport, read_json, read_rows, write_json)

FAULT_MARKER = "injected_fault.json"


class InjectedFault(RuntimeError):
    """The test-only worker fault of run.fault."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient norm under run.nonfinite=stop."""


@dataclass
class FaultInjector:
    """Fires run.fault once per job: a marker file in the run dir records that it did, so the restarted
    worker group (a new process, same run dir) runs through."""

    fail_at_step: int
    rank: int
    mode: FaultMode
    nan_at_step: int
    run_dir: str

    @classmethod
    def of(cls, run: RunConfig, output_dir: str) -> "FaultInjector":
        f = run.fault
        return cls(f.fail_at_step, f.rank, f.mode, f.nan_at_step, output_dir)

    def before_step(self, step: int, rank: int) -> None:
        """Fail here if this rank is to fail at `step` (1-based) and has not done so in this job yet."""
        if step != self.fail_at_step or rank != self.rank:
            return
        marker = Path(self.run_dir) / FAULT_MARKER
        if marker.exists():
            return
        write_json(marker, FaultRecord(step=step, rank=rank, mode=str(self.mode), time=time.time()))
        if self.mode is FaultMode.exit:
            os._exit(1)  # no cleanup, no exception: what a lost node looks like to Ray
        raise InjectedFault(f"injected fault at step {step} on rank {rank} (run.fault)")

    @contextmanager
    def maybe_nan(self, model: nn.Module, step: int) -> Iterator[None]:
        """Within this block the model's logits become NaN if `step` is run.fault.nan_at_step."""
        if step != self.nan_at_step:
            yield
            return

        def poison(module, args, output):
            output.logits = output.logits * float("nan")
            return output

        handle = model.register_forward_hook(poison)
        try:
            yield
        finally:
            handle.remove()


def check_finite(step: int, loss: float, grad_norm: float, mode: NonFinite) -> bool:
    """True when the step's numbers are finite. Otherwise raise NonFiniteError (mode stop) or return False
    (mode skip: train_step already left the weights and optimizer state untouched)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    if mode is NonFinite.stop:
        raise NonFiniteError(f"non-finite loss {loss} / grad norm {grad_norm} at step {step}; the run stops "
                             "(run.nonfinite=stop) and its last checkpoint is the last good one")
    return False


class AttemptRecord:
    """Rank 0's record, in the run dir's worker.json, of this job's attempts: one per start of the worker group
    (a restart after a worker fault is a new attempt). The driver merges it into summary.json."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / WORKER_FILE
        self.report = read_json(WorkerReport, self.path) if self.path.exists() else WorkerReport(attempts=0,
                                                                                               restart_history=[])
        self.is_restart = self.report.attempts > 0
        self.report.attempts += 1
        self.report.restarts = self.report.attempts - 1
        # A run.fault marker means the previous attempt ended in the injected fault (it fires once per job).
        marker = Path(output_dir) / FAULT_MARKER
        self._fault: Optional[FaultRecord] = None
        if self.is_restart and marker.exists() and not any(r.fault for r in self.report.restart_history):
            self._fault = read_json(FaultRecord, marker)

    def started(self, resumed_from_step: Optional[int], checkpoint: Optional[str], nothing_left: bool,
                resize: Optional[ResizeRecord] = None) -> None:
        """`nothing_left`: this attempt resumed at or past the run's last step. Only the first attempt decides
        already_done: a restart after the final checkpoint has nothing left either, but the job did train.
        `resize`: the change of mesh this attempt makes (tp2d_exp.driver.elastic), completed here."""
        now = time.time()
        self.report.resumed_from_step, self.report.resumed_from = resumed_from_step, checkpoint
        if resize is not None:
            self.report.resizes = [*(self.report.resizes or []), self._resized(resize, resumed_from_step or 0, now)]
        if not self.is_restart:
            self.report.already_done = nothing_left
            self.report.started_at = now
        else:
            self.report.restart_history.append(RestartRecord(attempt=self.report.attempts,
                                                             resumed_from_step=resumed_from_step,
                                                             checkpoint=checkpoint, fault=self._fault))
        self.write()

    def _resized(self, resize: ResizeRecord, step: int, now: float) -> ResizeRecord:
        """The resize with what only the new mesh knows: the checkpoint's step it went on from, the steps the old
        mesh trained past it (metrics.jsonl: every checkpoint step is logged), and the seconds from the end of
        that step (or the run's start) to now, the start of the first step on the new mesh."""
        rows = read_rows(self.path.parent / "metrics.jsonl")
        at = [r.time for r in rows if r.step == step and r.time is not None]
        since = at[-1] if at else self.report.started_at
        return replace(resize, step=step, redone_steps=max([r.step for r in rows], default=step) - step,
                       seconds_lost=round(now - since, 2) if since else None)

    def stopped(self, stop: StopRecord) -> None:
        self.report.stops = [*(self.report.stops or []), stop]
        self.write()

    def first_step_done(self) -> None:
        """Time from the injected fault to the first step after the restart: the cost of a restart."""
        if self._fault is not None:
            self.report.restart_history[-1].restart_s = round(time.time() - self._fault.time, 2)
            self.write()

    def failed(self, kind: FailureKind, error: str) -> None:
        self.report.failure, self.report.error = kind, error
        self.write()

    def write(self) -> None:
        write_json(self.path, self.report)
