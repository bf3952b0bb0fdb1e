"""Sharded, mesh-free checkpoints: DCP state dicts keyed by parameter FQN plus global training progress.

Every rank writes its own shard files into a local staging dir and reports it through ray.train.report;
Ray merges the ranks' files into one checkpoint dir in storage. Progress is stored as global quantities
(optimizer step, epoch, step within the epoch, samples consumed), never per-rank loader state, so a
checkpoint is readable under any mesh.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next step
    step_in_epoch: int = 0  # position of the next step within `epoch`
    samples_consumed: int = 0  # global samples seen so far
    tokens_consumed: int = 0  # global loss-bearing tokens seen so far

    def advance(self, plan, epoch: int, step_in_epoch: int, tokens: int) -> None:
        """Record that global batch `step_in_epoch` of `epoch` was trained on."""
        self.step += 1
        self.epoch, self.step_in_epoch = epoch, step_in_epoch + 1
        if self.step_in_epoch == plan.steps_per_epoch:
            self.epoch, self.step_in_epoch = epoch + 1, 0
        self.samples_consumed += plan.global_batch_size
        self.tokens_consumed += tokens


def write(path: str, model: nn.Module, optimizer, scheduler, state: TrainState) -> None:
    """Write this rank's shards (and, on rank 0, the metadata and progress) into `path`."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    if dist.get_rank() == 0:
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump({**asdict(state), "scheduler": scheduler.state_dict()}, f)


def save(model: nn.Module, optimizer, scheduler, state: TrainState, metrics: dict[str, Any]) -> None:
    """Write this rank's shards to a staging dir and report them to Ray Train, which merges every rank's
    files into one checkpoint dir in storage; every rank must call this at the same step."""
    import ray.train

    staging = tempfile.mkdtemp(prefix=f"tp2d-ckpt-{state.step}-")
    try:
        write(staging, model, optimizer, scheduler, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging),
                         checkpoint_dir_name=f"checkpoint_{state.step:07d}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load(path: str, model: nn.Module, optimizer, scheduler) -> TrainState:
    """Load a checkpoint dir written by `save` (under any mesh shape) into the sharded model/optimizer."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, STATE_FILE)) as f:
        saved = json.load(f)
    scheduler.load_state_dict(saved.pop("scheduler"))
    return TrainState(**saved)
