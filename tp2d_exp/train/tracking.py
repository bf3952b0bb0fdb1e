"""Experiment tracking on rank 0: Weights & Biases and the run dir's metrics.jsonl.

A tracker failure never stops training, and costs seconds, not the W&B record. When W&B cannot be reached or
refuses the key at init (bounded: INIT_TIMEOUT_S), or fails mid-run (its service process dies), the run goes
on recording offline under the same W&B run id, for `wandb sync` to upload later; only when W&B cannot even
record offline (an unwritable or full dir) is it switched off. Each is reported once, and metrics.jsonl is
written regardless. After a worker restart the same W&B run is resumed (its id is kept in the run dir), so
one job is one W&B run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from tp2d_exp.config.errors import first_line
from tp2d_exp.config.schema import LoggerConfig
from tp2d_exp.config.spec import WandbSetup
from tp2d_exp.records import StepRow

log = logging.getLogger(__name__)

# How long wandb.init waits for the server before the run goes offline (W&B's default: 90 s); the switch itself
# takes about a second more. WANDB_INIT_TIMEOUT, W&B's own variable, overrides it.
INIT_TIMEOUT_S = 5.0
# How long finish() of an online run waits for uploads to a W&B that stopped answering (W&B's default: for
# ever); what it did not take stays in the run's local record, for `wandb sync`.
FINISH_TIMEOUT_S = 30.0


class Tracker:
    """Writes metrics.jsonl and, when `wandb` is set, a W&B run. Use as a context manager so W&B is always
    finished, even when training raises."""

    def __init__(self, output_dir: str, logger: LoggerConfig, wandb: Optional[WandbSetup], run_name: str,
                 config: dict[str, Any]):
        self.metrics_path = Path(output_dir) / "metrics.jsonl"
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        # Where this tracker's rows start (earlier attempts of the job wrote the rows before).
        self.first_row_at = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        self.wandb_run = None
        self.wandb_dir: str | None = None
        self.min_free_bytes = logger.min_free_mb * 2**20
        self.went_offline = False  # the offline run that takes over after a failure is tried once
        if wandb is not None:
            self._init_args = dict(project=logger.project, entity=logger.entity, group=wandb.group, name=run_name,
                                   tags=list(wandb.tags), config=config, dir=wandb.dir)
            self._init_wandb(wandb)

    def _init_wandb(self, setup: WandbSetup) -> None:
        id_file = self.metrics_path.parent / "wandb_id"  # one W&B run per job, across worker restarts
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        self._init_args["id"] = id_file.read_text()
        self.since = time.monotonic()  # what a failure costs is counted from here (said in its warning)
        try:
            os.makedirs(setup.dir, exist_ok=True)
            self._open(str(setup.mode))
        except Exception as e:  # noqa: BLE001 - any tracker failure must leave training running
            online = setup.mode == "online"
            server = f" at {os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')}" if online else ""
            self._wandb_failed(f"init ({setup.mode}{server})", e, go_offline=online)

    def _open(self, mode: str) -> None:
        """A W&B run in `mode` with this job's run id (resumed if it exists)."""
        import wandb

        self._check_free_space(self._init_args["dir"])
        settings = wandb.Settings(console="off", silent=True,
                                  init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S)),
                                  finish_timeout=FINISH_TIMEOUT_S, finish_timeout_raises=True)
        self.wandb_run = wandb.init(**self._init_args, mode=mode, reinit="finish_previous", resume="allow",
                                    settings=settings)
        self.wandb_dir = str(Path(self.wandb_run.dir).parent)

    def _check_free_space(self, path: str) -> None:
        """W&B writes from a background process and drops records silently when the disk is full, so the
        free space is checked here instead."""
        free = shutil.disk_usage(path).free
        if free < self.min_free_bytes:
            raise OSError(f"only {free / 2**20:.0f} MiB free in {path}, below logger.min_free_mb="
                          f"{self.min_free_bytes // 2**20}")

    def _wandb_failed(self, what: str, e: Exception, go_offline: bool = True) -> bool:
        """Said once: W&B `what` failed, so the rest of the run is recorded offline (same run id), or, when W&B
        cannot record even offline, in metrics.jsonl only. True if a W&B run records again."""
        self.wandb_run = None
        if go_offline and not self.went_offline:
            self.went_offline = True
            _teardown_wandb()
            try:
                self._open("offline")
                self._relog()
                log.warning("W&B %s failed (%s); recording offline after %.1f s in %s, upload it later with "
                            "`wandb sync %s`", what, first_line(e), time.monotonic() - self.since, self.wandb_dir,
                            self.wandb_dir)
                return True
            except Exception as offline_error:  # noqa: BLE001
                self.wandb_run = None
                e = RuntimeError(f"{first_line(e)}; offline too: {first_line(offline_error)}")
        log.warning("W&B %s failed, continuing without W&B (metrics stay in %s): %s", what, self.metrics_path,
                    first_line(e))
        return False

    def _relog(self) -> None:
        """Every row this tracker logged, from metrics.jsonl, into the offline run that takes over: a W&B
        service that died took its last records with it."""
        if not self.metrics_path.exists():  # nothing logged yet
            return
        with open(self.metrics_path) as f:
            f.seek(self.first_row_at)
            for line in f:
                flat = json.loads(line)
                self.wandb_run.log(wandb_keys(flat), step=flat["step"])

    def log(self, row: StepRow) -> None:
        self.since = time.monotonic()
        flat = row.flat()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(flat) + "\n")
        if self.wandb_run is not None:
            try:
                self._check_free_space(self.wandb_run.dir)
                self.wandb_run.log(wandb_keys(flat), step=row.step)
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("log", e)  # an offline run that takes over re-logs this row too

    def summary(self, values: dict[str, Any]) -> None:
        self.since = time.monotonic()
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update(wandb_keys(values))
            except Exception as e:  # noqa: BLE001
                if self._wandb_failed("summary", e):
                    self.summary(values)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish(exit_code=1 if exc_type else 0)
            except TimeoutError:
                log.warning("W&B did not take the end of the run within %gs; the rest is in %s, upload it later "
                            "with `wandb sync %s`", FINISH_TIMEOUT_S, self.wandb_dir, self.wandb_dir)
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed (%s); the run's record is in %s", first_line(e), self.wandb_dir)


def _teardown_wandb() -> None:
    """End W&B's service process: a failed run still holds its run id there, which the offline run takes
    over. A service that died cannot be told, and needs no telling."""
    with contextlib.suppress(Exception):
        import wandb

        wandb.teardown()


def wandb_keys(values: dict[str, Any]) -> dict[str, Any]:
    """metrics.jsonl's keys as W&B shows them: the held-out metrics in a val/ section (val_loss -> val/loss)."""
    return {f"val/{k.removeprefix('val_')}" if k.startswith("val_") else k: v for k, v in values.items()}
