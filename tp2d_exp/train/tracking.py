"""Experiment tracking on rank 0: Weights & Biases and the run dir's metrics.jsonl.

A tracker failure never stops training: W&B errors (bad credentials, unreachable server, unwritable or full
dir) are reported once and W&B is switched off for the rest of the run; metrics.jsonl is written regardless.
After a worker restart the same W&B run is resumed (its id is kept in the run dir), so one job is one W&B run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from tp2d_exp.config.errors import first_line
from tp2d_exp.config.schema import LoggerConfig
from tp2d_exp.config.spec import WandbSetup
from tp2d_exp.records import StepRow

log = logging.getLogger(__name__)


class Tracker:
    """Writes metrics.jsonl and, when `wandb` is set, a W&B run. Use as a context manager so W&B is always
    finished, even when training raises."""

    def __init__(self, output_dir: str, logger: LoggerConfig, wandb: Optional[WandbSetup], run_name: str,
                 config: dict[str, Any]):
        self.metrics_path = Path(output_dir) / "metrics.jsonl"
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb_run = None
        self.wandb_dir: str | None = None
        self.min_free_bytes = logger.min_free_mb * 2**20
        if wandb is not None:
            self._init_wandb(logger, wandb, run_name, config)

    def _init_wandb(self, lg: LoggerConfig, setup: WandbSetup, run_name: str, config: dict[str, Any]) -> None:
        try:
            import wandb

            os.makedirs(setup.dir, exist_ok=True)
            self._check_free_space(setup.dir)
            id_file = self.metrics_path.parent / "wandb_id"  # one W&B run per job, across worker restarts
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            self.wandb_run = wandb.init(
                project=lg.project, entity=lg.entity, group=setup.group, name=run_name, tags=list(setup.tags),
                config=config, dir=setup.dir, mode=str(setup.mode), reinit="finish_previous", id=id_file.read_text(),
                resume="allow", settings=wandb.Settings(console="off", silent=True))
            self.wandb_dir = str(Path(self.wandb_run.dir).parent)
        except Exception as e:  # noqa: BLE001 - any tracker failure must leave training running
            server = f" at {os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')}" if setup.mode == "online" else ""
            self._wandb_failed(f"init ({setup.mode}{server})", e)

    def _check_free_space(self, path: str) -> None:
        """W&B writes from a background process and drops records silently when the disk is full, so the
        free space is checked here instead."""
        free = shutil.disk_usage(path).free
        if free < self.min_free_bytes:
            raise OSError(f"only {free / 2**20:.0f} MiB free in {path}, below logger.min_free_mb="
                          f"{self.min_free_bytes // 2**20}")

    def _wandb_failed(self, what: str, e: Exception) -> None:
        log.warning("W&B %s failed, continuing without W&B (metrics stay in %s): %s", what, self.metrics_path,
                    first_line(e))
        self.wandb_run = None

    def log(self, row: StepRow) -> None:
        flat = row.flat()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(flat) + "\n")
        if self.wandb_run is not None:
            try:
                self._check_free_space(self.wandb_run.dir)
                self.wandb_run.log(flat, step=row.step)
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("log", e)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update(values)
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("summary", e)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish(exit_code=1 if exc_type else 0)
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("finish", e)
