"""Faults and what the run does about them: injected worker faults (test-only), the non-finite guard, and the
record of restarts that summary.json and W&B show.

Worker faults are retried by Ray (FailureConfig(max_failures)): the worker group restarts and resumes from
the newest intact checkpoint. A non-finite loss or gradient norm is deterministic, so retrying it would only
repeat it: `run.nonfinite=stop` ends the run as failed without a retry (every rank sees the same global
numbers, so every rank stops at the same step); `skip` drops that step's update and goes on.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch.nn as nn

FAULT_MARKER = "injected_fault.json"
WORKER_FILE = "worker.json"


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
    mode: str
    nan_at_step: int
    run_dir: str

    @classmethod
    def from_config(cls, run: dict[str, Any], output_dir: str) -> "FaultInjector":
        f = run["fault"]
        return cls(f["fail_at_step"], f["rank"], f["mode"], f["nan_at_step"], output_dir)

    def before_step(self, step: int, rank: int) -> None:
        """Fail here if this rank is to fail at `step` (1-based) and has not done so in this job yet."""
        if step != self.fail_at_step or rank != self.rank:
            return
        marker = Path(self.run_dir) / FAULT_MARKER
        if marker.exists():
            return
        marker.write_text(json.dumps({"step": step, "rank": rank, "mode": self.mode, "time": time.time()}))
        if self.mode == "exit":
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


def check_finite(step: int, loss: float, grad_norm: float, mode: str) -> bool:
    """True when the step's numbers are finite. Otherwise raise NonFiniteError (mode stop) or return False
    (mode skip: train_step already left the weights and optimizer state untouched)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    if mode == "stop":
        raise NonFiniteError(f"non-finite loss {loss} / grad norm {grad_norm} at step {step}; the run stops "
                             "(run.nonfinite=stop) and its last checkpoint is the last good one")
    return False


class AttemptRecord:
    """Rank 0's record, in the run dir's worker.json, of this job's attempts: one per start of the worker group
    (a restart after a worker fault is a new attempt). The driver merges it into summary.json."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / WORKER_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.setdefault("restart_history", [])
        self.is_restart = "attempts" in self.data
        self.data["attempts"] = self.data.get("attempts", 0) + 1
        self.data["restarts"] = self.data["attempts"] - 1
        # A run.fault marker means the previous attempt ended in the injected fault (it fires once per job).
        marker = Path(output_dir) / FAULT_MARKER
        self._fault: Optional[dict[str, Any]] = None
        if self.is_restart and marker.exists() and not any("fault" in r for r in self.data["restart_history"]):
            self._fault = json.loads(marker.read_text())

    def started(self, resumed_from_step: Optional[int], checkpoint: Optional[str], **extra: Any) -> None:
        self.data.update(resumed_from_step=resumed_from_step, resumed_from=checkpoint, **extra)
        if self.is_restart:
            entry: dict[str, Any] = {"attempt": self.data["attempts"], "resumed_from_step": resumed_from_step,
                                     "checkpoint": checkpoint}
            if self._fault is not None:
                entry["fault"] = self._fault
            self.data["restart_history"].append(entry)
        self._write()

    def first_step_done(self) -> None:
        """Time from the injected fault to the first step after the restart: the cost of a restart."""
        if self._fault is not None:
            self.data["restart_history"][-1]["restart_s"] = round(time.time() - self._fault["time"], 2)
            self._write()

    def record(self, **facts: Any) -> None:
        self.data.update(facts)
        self._write()

    def failed(self, error: str) -> None:
        self.data.update(status="failed", error=error)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)
