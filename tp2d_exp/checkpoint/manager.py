"""Sharded, mesh-free checkpoints that are safe to resume: DCP state dicts keyed by parameter FQN, global
training progress, RNG state and the HF config + tokenizer of the run.

Layout of one checkpoint, `<storage_path>/<run name>/checkpoint_<step>[_<n>]/`:
    .metadata, __<rank>_0.distcp   DCP: model and optimizer, any mesh can read it (resharding on load)
    train_state.json                progress (step, epoch, position in the data order, samples), LR schedule,
                                    the data order it belongs to (global batch size, corpus size, seed);
                                    the name predates `Progress` and stays, so older checkpoints resume
    rng_rank<r>.pt                  each rank's torch RNG state
    hf/                             HF config.json + tokenizer: export needs nothing else
    commit.json                     written last: the size of every file above

Safety rules:
- Every rank writes straight into the final dir; rank 0 writes commit.json after a barrier, so a checkpoint
  counts only once every rank has finished writing it. Only then is it reported to Ray, so Ray's retention
  (num_to_keep) never deletes the newest intact checkpoint before a newer one is committed.
- A checkpoint dir is never written twice: a step whose dir exists (left by a failed attempt) gets `_<n>`.
- On resume the newest checkpoint whose files match commit.json is used; a partial or corrupt one is
  reported in one line and the previous one is tried.
- Progress is stored as global quantities, never per-rank loader state, so any mesh resumes it; a different
  global batch size resumes at the same sample of the epoch's order when that sample starts a batch.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

from tp2d_exp.config.errors import ConfigError, first_line
from tp2d_exp.config.spec import ARCH_KEYS, Architecture, JobSpec
from tp2d_exp.data.order import BatchOrder
from tp2d_exp.records import read_json, write_json

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
COMMIT_FILE = "commit.json"
HF_DIR = "hf"
_DIR_RE = re.compile(r"^checkpoint_(\d+)(?:_(\d+))?$")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or corrupt; the message is one line. Resume falls back past it."""


class CheckpointMismatch(ConfigError):
    """A checkpoint that does not fit this job (another model or data order); never fallen back past."""


@dataclass
class Progress:
    """Training progress, as global quantities any mesh can resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next step
    step_in_epoch: int = 0  # position of the next step within `epoch`
    samples_consumed: int = 0  # global samples seen so far
    tokens_consumed: int = 0  # global loss-bearing tokens seen so far
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss (run.nonfinite=skip)

    def advance(self, order: BatchOrder, epoch: int, step_in_epoch: int, tokens: int) -> None:
        """Record that global batch `step_in_epoch` of `epoch` was trained on."""
        self.step += 1
        self.epoch, self.step_in_epoch = epoch, step_in_epoch + 1
        if self.step_in_epoch == order.steps_per_epoch:
            self.epoch, self.step_in_epoch = epoch + 1, 0
        self.samples_consumed += order.global_batch_size
        self.tokens_consumed += tokens


@dataclass
class DataOrderRecord:
    """The batch order a checkpoint's position belongs to."""

    global_batch_size: int
    num_samples: int
    seed: int


@dataclass
class SavedProgress(Progress):
    """train_state.json: the progress plus what resuming it needs."""

    scheduler: dict[str, Any] = field(default_factory=dict)  # the LR scheduler's state_dict
    world_size: int = 0  # of the writing job (per-rank RNG states map onto the same world size only)
    data: Optional[DataOrderRecord] = None


@dataclass
class Commit:
    """commit.json, written last: every file of the checkpoint and its size."""

    files: dict[str, int]


def due(progress: Progress, every: int, total_steps: int) -> bool:
    """Whether to checkpoint after the step just recorded in `progress`: every `every` steps (0 = never), at
    each epoch end and at the last step."""
    return progress.step >= total_steps or progress.step_in_epoch == 0 or (every > 0 and progress.step % every == 0)


@dataclass
class Restored:
    path: str
    progress: Progress  # position already mapped onto this job's batch order


# ---- finding and checking checkpoints (plain files: the driver and tools use these without a process group)


def checkpoint_dirs(run_dir: str) -> list[str]:
    """Checkpoint dirs of a Ray run dir, newest first (by step, then by rewrite suffix)."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = _DIR_RE.match(name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(m[1]), int(m[2] or 0), os.path.join(run_dir, name)))
    return [p for *_, p in sorted(found, reverse=True)]


def is_committed(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMMIT_FILE))


def verify(path: str) -> None:
    """Raise CheckpointError unless every file listed in commit.json is there with its committed size."""
    try:
        files = read_json(Commit, os.path.join(path, COMMIT_FILE)).files
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {COMMIT_FILE}: not every rank finished writing it") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable {COMMIT_FILE} ({e})") from None
    for name, size in sorted(files.items()):
        file = os.path.join(path, name)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual != size:
            what = "is missing" if actual is None else f"has {actual} of its {size} bytes"
            raise CheckpointError(f"{path} is corrupt: {name} {what}")


def intact_candidates(run_dir: str) -> list[str]:
    """Committed checkpoints of a run dir whose files are intact, newest first; each one skipped is reported
    in one line. Raises CheckpointError when checkpoints were committed but none is intact (starting over
    would silently lose the run)."""
    committed, intact = 0, []
    for path in checkpoint_dirs(run_dir):
        if not is_committed(path):
            log.warning("skipping %s: no %s, not every rank finished writing it", path, COMMIT_FILE)
            continue
        committed += 1
        try:
            verify(path)
            intact.append(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    if committed and not intact:
        raise CheckpointError(f"{run_dir} has {committed} committed checkpoint(s) but none is intact; "
                              "delete the run dir to start over (keep more with run.num_to_keep)")
    return intact


def resolve(resume_from: str, storage_path: str) -> str:
    """The checkpoint dir that `run.resume_from` names: a checkpoint dir, a Ray run dir or a run name under
    `storage_path` (its newest intact checkpoint). Raises ConfigError when there is none."""
    for path in (os.path.abspath(os.path.expanduser(resume_from)), os.path.join(storage_path, resume_from)):
        try:
            if os.path.isfile(os.path.join(path, ".metadata")) or is_committed(path):
                verify(path)
                return path
            if checkpoint_dirs(path):
                intact = intact_candidates(path)
                if not intact:
                    raise CheckpointError(f"{path} has no committed checkpoint")
                return intact[0]
        except CheckpointError as e:
            raise ConfigError(f"run.resume_from={resume_from!r}: {e}") from None
    raise ConfigError(f"run.resume_from={resume_from!r} is neither a checkpoint dir, a Ray run dir nor a run "
                      f"name under {storage_path}; give e.g. the `checkpoint` path of a run's summary.json")


def resume_source(spec: JobSpec) -> Optional[str]:
    """Check, before any worker starts, the checkpoint a job will start from: the run's own newest intact
    one (a same-name rerun), else `run.resume_from`. Returns run.resume_from resolved to a checkpoint dir.
    Raises ConfigError when the checkpoint cannot be found or does not fit the job."""
    r = spec.resolved
    resume_from = resolve(spec.run.resume_from, r.storage_path) if spec.run.resume_from else None
    try:
        own = intact_candidates(os.path.join(r.storage_path, r.run_name))
    except CheckpointError as e:
        raise ConfigError(f"run.name={r.run_name!r}: {e}") from None
    start = own[0] if own else resume_from
    if start:
        check_architecture(start, spec.arch)
        try:
            data_position(read_progress(start), BatchOrder.of(spec))
        except CheckpointError as e:
            raise ConfigError(f"checkpoint {start}: {e}") from None
    return resume_from


def read_progress(path: str) -> SavedProgress:
    return read_json(SavedProgress, os.path.join(path, STATE_FILE))


def data_position(saved: SavedProgress, order: BatchOrder) -> tuple[int, int]:
    """(epoch, step_in_epoch) of the next step in `order`, from a checkpoint's progress. The epoch's sample
    order depends only on (seed, corpus size, epoch), so the position in it is `step_in_epoch * global batch`
    samples whatever the mesh; a different global batch size resumes there when that sample starts one of
    its batches."""
    data = saved.data
    if data is None:
        raise CheckpointError(f"its {STATE_FILE} records no data order (not written by this project)")
    if (data.num_samples, data.seed) != (order.num_samples, order.seed):
        raise CheckpointMismatch(
            f"the checkpoint belongs to another data order ({data.num_samples} samples, run.seed="
            f"{data.seed}; this job: {order.num_samples}, {order.seed}); resume with its data.* and run.seed")
    epoch, step_in_epoch, old = saved.epoch, saved.step_in_epoch, data.global_batch_size
    if old == order.global_batch_size:
        return epoch, step_in_epoch
    consumed = step_in_epoch * old
    if consumed % order.global_batch_size:
        raise CheckpointMismatch(
            f"run.global_batch_size={order.global_batch_size}: the checkpoint (step {saved.step}) is {consumed} "
            f"samples into epoch {epoch}, not a multiple of it; resume with run.global_batch_size={old} or "
            f"a divisor of {consumed}")
    step = consumed // order.global_batch_size
    return (epoch + 1, 0) if step >= order.steps_per_epoch else (epoch, step)


def check_architecture(path: str, arch: Architecture) -> None:
    """Raise CheckpointMismatch when the architecture differs from the one the checkpoint was written with."""
    from transformers import AutoConfig

    saved = AutoConfig.from_pretrained(os.path.join(path, HF_DIR))
    diffs = [f"model.{k}={getattr(arch, k)} (checkpoint: {getattr(saved, k)})" for k in ARCH_KEYS
             if hasattr(saved, k) and getattr(saved, k) != getattr(arch, k)]
    if saved.model_type != arch.family:
        diffs.insert(0, f"model.family={arch.family} (checkpoint: {saved.model_type})")
    if diffs:
        raise CheckpointMismatch(f"checkpoint {path} was written by another model: {', '.join(diffs)}; "
                                 "resume it with the model it was trained with")


def check_fits(path: str, model: nn.Module) -> None:
    """Raise CheckpointMismatch when the checkpoint's model tensors (FQN -> global shape) do not match."""
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - a truncated or garbled .metadata
        raise CheckpointError(f"{path}: unreadable .metadata ({type(e).__name__}: {e})") from None
    saved = {k.removeprefix("model."): tuple(v.size) for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and hasattr(v, "size")}
    wanted = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    problems = []
    if missing := sorted(wanted.keys() - saved.keys()):
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if extra := sorted(saved.keys() - wanted.keys()):
        problems.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    if shapes := [f"{k}: {list(saved[k])} vs {list(v)}" for k, v in wanted.items() if k in saved and saved[k] != v]:
        problems.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
    if problems:
        raise CheckpointMismatch(f"checkpoint {path} does not fit this model: parameters {'; '.join(problems)}; "
                                 "resume it with the model config it was written with (its hf/config.json)")


# ---- writing and loading (collective: every rank calls these together)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _commit(path: str) -> None:
    """Record every file's size in commit.json, atomically; called once all ranks have written."""
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    write_json(os.path.join(path, COMMIT_FILE), Commit(files=files))


class CheckpointManager:
    """Writes and restores the checkpoints of one run (all ranks); `run_dir` is its Ray run dir."""

    def __init__(self, model: nn.Module, optimizer, scheduler, order: BatchOrder, run_dir: str, hf_config: Any,
                 tokenizer_dir: str):
        self.model, self.optimizer, self.scheduler, self.order = model, optimizer, scheduler, order
        self.run_dir, self.hf_config, self.tokenizer_dir = run_dir, hf_config, tokenizer_dir
        self._tokenizer = None

    def write(self, progress: Progress) -> str:
        """Write and commit a checkpoint of `progress`; returns its dir once every rank has finished."""
        rank = dist.get_rank()
        path = [None]
        if rank == 0:
            name, n = f"checkpoint_{progress.step:07d}", 0
            while os.path.exists(os.path.join(self.run_dir, name)):  # a failed attempt's leftover: keep it
                n += 1
                name = f"checkpoint_{progress.step:07d}_{n}"
            path = [os.path.join(self.run_dir, name)]
            os.makedirs(path[0])
        dist.broadcast_object_list(path, src=0)
        path = path[0]
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        # Collective; the coordinator writes .metadata only after every rank's shards are written.
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        torch.save(_rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
        if rank == 0:
            o = self.order
            saved = SavedProgress(**{f.name: getattr(progress, f.name) for f in fields(Progress)},
                                  scheduler=self.scheduler.state_dict(), world_size=dist.get_world_size(),
                                  data=DataOrderRecord(o.global_batch_size, o.num_samples, o.seed))
            write_json(os.path.join(path, STATE_FILE), saved)
            self._write_hf(os.path.join(path, HF_DIR))
        dist.barrier()
        if rank == 0:
            _commit(path)
        dist.barrier()  # nobody reports (and lets Ray delete older ones) before the commit
        return path

    def _write_hf(self, out: str) -> None:
        from tp2d_exp.data.tokenizer import load_tokenizer

        self.hf_config.save_pretrained(out)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        self._tokenizer.save_pretrained(out)

    def load(self, path: str) -> Progress:
        """Load a checkpoint written under any mesh; the position is mapped onto this job's batch order."""
        check_fits(path, self.model)
        saved = read_progress(path)
        epoch, step_in_epoch = data_position(saved, self.order)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(sd, checkpoint_id=path)
        except Exception as e:  # noqa: BLE001 - DCP gathers every rank's read error; all ranks land here
            raise CheckpointError(f"{path} could not be read: {type(e).__name__}: {first_line(e)}") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        self.scheduler.load_state_dict(saved.scheduler)
        rng_file = os.path.join(path, f"rng_rank{dist.get_rank()}.pt")
        if saved.world_size == dist.get_world_size() and os.path.isfile(rng_file):
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        else:  # per-rank streams do not map onto another world size; the seeded streams of this job stay
            log.info("RNG state not restored: written by %d ranks, resumed by %d", saved.world_size,
                     dist.get_world_size())
        return Progress(step=saved.step, epoch=epoch, step_in_epoch=step_in_epoch,
                        samples_consumed=saved.samples_consumed, tokens_consumed=saved.tokens_consumed,
                        skipped_steps=saved.skipped_steps)

    def restore(self, resume_from: Optional[str]) -> Optional[Restored]:
        """Load the run's newest intact checkpoint, else `resume_from` (a checkpoint dir), else nothing.
        Rank 0 picks the candidates so every rank tries the same ones in the same order."""
        picked: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                own = intact_candidates(self.run_dir)
                picked = [own or ([resume_from] if resume_from else [])]
            except CheckpointError as e:  # every rank must raise it, not only rank 0
                picked = [e]
        dist.broadcast_object_list(picked, src=0)
        if isinstance(picked[0], Exception):
            raise picked[0]
        for path in picked[0]:
            try:
                return Restored(path, self.load(path))
            except CheckpointError as e:
                log.warning("skipping checkpoint: %s", e)
        if picked[0]:
            raise CheckpointError(f"no checkpoint of {self.run_dir} could be loaded (see the lines above)")
        return None


def load_model_state(path: str) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a checkpoint, read in this process without a process group:
    tensors of the saved global shapes, filled by DCP (which reassembles every rank's shards)."""
    verify(path)
    metadata = dcp.FileSystemReader(path).read_metadata()
    model = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load({"model": model}, checkpoint_id=path, no_dist=True)
    return model
