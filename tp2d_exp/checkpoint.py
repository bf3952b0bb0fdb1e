"""Sharded, mesh-free checkpoints that are safe to resume: DCP state dicts keyed by parameter FQN, global
training progress, RNG state and the HF config + tokenizer of the run.

Layout of one checkpoint, `<storage_path>/<run name>/checkpoint_<step>[_<n>]/`:
    .metadata, __<rank>_0.distcp   DCP: model and optimizer, any mesh can read it (resharding on load)
    train_state.json                progress (step, epoch, position in the data order, samples), LR schedule,
                                    the data order it belongs to (global batch size, corpus size, seed)
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

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

from tp2d_exp.config import ARCH_KEYS, ConfigError
from tp2d_exp.data import BatchPlan

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
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next step
    step_in_epoch: int = 0  # position of the next step within `epoch`
    samples_consumed: int = 0  # global samples seen so far
    tokens_consumed: int = 0  # global loss-bearing tokens seen so far
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss (run.nonfinite=skip)

    def advance(self, plan, epoch: int, step_in_epoch: int, tokens: int) -> None:
        """Record that global batch `step_in_epoch` of `epoch` was trained on."""
        self.step += 1
        self.epoch, self.step_in_epoch = epoch, step_in_epoch + 1
        if self.step_in_epoch == plan.steps_per_epoch:
            self.epoch, self.step_in_epoch = epoch + 1, 0
        self.samples_consumed += plan.global_batch_size
        self.tokens_consumed += tokens


def due(state: TrainState, every: int, total_steps: int) -> bool:
    """Whether to checkpoint after the step just recorded in `state`: every `every` steps (0 = never), at
    each epoch end and at the last step."""
    return state.step >= total_steps or state.step_in_epoch == 0 or (every > 0 and state.step % every == 0)


@dataclass
class Restored:
    path: str
    state: TrainState  # position already mapped onto this job's batch plan


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
        with open(os.path.join(path, COMMIT_FILE)) as f:
            files: dict[str, int] = json.load(f)["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {COMMIT_FILE}: not every rank finished writing it") from None
    except (OSError, ValueError, KeyError) as e:
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


def resume_source(cfg: dict[str, Any]) -> Optional[str]:
    """Check, before any worker starts, the checkpoint a job will start from: the run's own newest intact
    one (a same-name rerun), else `run.resume_from`. Returns run.resume_from resolved to a checkpoint dir.
    Raises ConfigError when the checkpoint cannot be found or does not fit the job."""
    run = cfg["run"]
    resume_from = resolve(run["resume_from"], cfg["storage_path"]) if run["resume_from"] else None
    try:
        own = intact_candidates(os.path.join(cfg["storage_path"], cfg["run_name"]))
    except CheckpointError as e:
        raise ConfigError(f"run.name={cfg['run_name']!r}: {e}") from None
    start = own[0] if own else resume_from
    if start:
        check_architecture(start, cfg["model"])
        plan = BatchPlan(num_samples=cfg["num_samples"], global_batch_size=cfg["global_batch_size"],
                         micro_batch_size=run["batch_size_per_gpu"], dp=cfg["parallelism"]["dp"], seed=run["seed"])
        data_position(read_state(start), plan)
    return resume_from


def read_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def data_position(saved: dict[str, Any], plan: BatchPlan) -> tuple[int, int]:
    """(epoch, step_in_epoch) of the next step on `plan`, from a checkpoint's train_state. The epoch's sample
    order depends only on (seed, corpus size, epoch), so the position in it is `step_in_epoch * global batch`
    samples whatever the mesh; a different global batch size resumes there when that sample starts one of
    its batches."""
    data = saved["data"]
    if (data["num_samples"], data["seed"]) != (plan.num_samples, plan.seed):
        raise CheckpointMismatch(
            f"the checkpoint belongs to another data order ({data['num_samples']} samples, run.seed="
            f"{data['seed']}; this job: {plan.num_samples}, {plan.seed}); resume with its data.* and run.seed")
    epoch, step_in_epoch, old = saved["epoch"], saved["step_in_epoch"], data["global_batch_size"]
    if old == plan.global_batch_size:
        return epoch, step_in_epoch
    consumed = step_in_epoch * old
    if consumed % plan.global_batch_size:
        raise CheckpointMismatch(
            f"run.global_batch_size={plan.global_batch_size}: the checkpoint (step {saved['step']}) is {consumed} "
            f"samples into epoch {epoch}, not a multiple of it; resume with run.global_batch_size={old} or "
            f"a divisor of {consumed}")
    step = consumed // plan.global_batch_size
    return (epoch + 1, 0) if step >= plan.steps_per_epoch else (epoch, step)


def check_architecture(path: str, model_cfg: dict[str, Any]) -> None:
    """Raise CheckpointMismatch when the model config differs from the one the checkpoint was written with."""
    from transformers import AutoConfig

    saved = AutoConfig.from_pretrained(os.path.join(path, HF_DIR))
    diffs = [f"model.{k}={model_cfg[k]} (checkpoint: {getattr(saved, k)})" for k in ARCH_KEYS
             if hasattr(saved, k) and getattr(saved, k) != model_cfg[k]]
    if saved.model_type != model_cfg["family"]:
        diffs.insert(0, f"model.family={model_cfg['family']} (checkpoint: {saved.model_type})")
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
    tmp = os.path.join(path, COMMIT_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
    os.replace(tmp, os.path.join(path, COMMIT_FILE))


class CheckpointManager:
    """Writes and restores the checkpoints of one run (all ranks); `run_dir` is its Ray run dir."""

    def __init__(self, model: nn.Module, optimizer, scheduler, plan: BatchPlan, run_dir: str, hf_config: Any,
                 tokenizer_dir: str):
        self.model, self.optimizer, self.scheduler, self.plan = model, optimizer, scheduler, plan
        self.run_dir, self.hf_config, self.tokenizer_dir = run_dir, hf_config, tokenizer_dir
        self._tokenizer = None

    def write(self, state: TrainState) -> str:
        """Write and commit a checkpoint of `state`; returns its dir once every rank has finished."""
        rank = dist.get_rank()
        path = [None]
        if rank == 0:
            name, n = f"checkpoint_{state.step:07d}", 0
            while os.path.exists(os.path.join(self.run_dir, name)):  # a failed attempt's leftover: keep it
                n += 1
                name = f"checkpoint_{state.step:07d}_{n}"
            path = [os.path.join(self.run_dir, name)]
            os.makedirs(path[0])
        dist.broadcast_object_list(path, src=0)
        path = path[0]
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        # Collective; the coordinator writes .metadata only after every rank's shards are written.
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        torch.save(_rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
        if rank == 0:
            saved = {**asdict(state), "scheduler": self.scheduler.state_dict(), "world_size": dist.get_world_size(),
                     "data": {"global_batch_size": self.plan.global_batch_size,
                              "num_samples": self.plan.num_samples, "seed": self.plan.seed}}
            with open(os.path.join(path, STATE_FILE), "w") as f:
                json.dump(saved, f)
            self._write_hf(os.path.join(path, HF_DIR))
        dist.barrier()
        if rank == 0:
            _commit(path)
        dist.barrier()  # nobody reports (and lets Ray delete older ones) before the commit
        return path

    def _write_hf(self, out: str) -> None:
        from tp2d_exp.tokenizer import load_tokenizer

        self.hf_config.save_pretrained(out)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        self._tokenizer.save_pretrained(out)

    def save(self, state: TrainState, metrics: dict[str, Any]) -> str:
        """Write, commit, then report the checkpoint to Ray Train (already in its run dir: no upload)."""
        import ray.train

        path = self.write(state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint(path),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        return path

    def load(self, path: str) -> TrainState:
        """Load a checkpoint written under any mesh; the position is mapped onto this job's batch plan."""
        check_fits(path, self.model)
        saved = read_state(path)
        epoch, step_in_epoch = data_position(saved, self.plan)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(sd, checkpoint_id=path)
        except Exception as e:  # noqa: BLE001 - DCP gathers every rank's read error; all ranks land here
            first = str(e).strip().splitlines()
            raise CheckpointError(f"{path} could not be read: {type(e).__name__}: {first[0] if first else ''}") \
                from None
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        self.scheduler.load_state_dict(saved["scheduler"])
        rng_file = os.path.join(path, f"rng_rank{dist.get_rank()}.pt")
        if saved["world_size"] == dist.get_world_size() and os.path.isfile(rng_file):
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        else:  # per-rank streams do not map onto another world size; the seeded streams of this job stay
            log.info("RNG state not restored: written by %d ranks, resumed by %d", saved["world_size"],
                     dist.get_world_size())
        fields = {k: saved[k] for k in ("step", "samples_consumed", "tokens_consumed", "skipped_steps")}
        return TrainState(**fields, epoch=epoch, step_in_epoch=step_in_epoch)

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
    """The full (unsharded) model tensors of a checkpoint, read in this process without a process group."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    verify(path)
    return _load_state_dict_from_keys({"model"}, checkpoint_id=path)["model"]
