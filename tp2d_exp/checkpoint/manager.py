"""Sharded, mesh-free checkpoints that are safe to resume: DCP state dicts keyed by parameter FQN, global
training progress counted in samples, RNG state and the HF config + tokenizer of the run.

Layout of one checkpoint, `<storage_path>/<run name>/checkpoint_<step>[_<n>]/` (a path or an s3:// URI):
    .metadata, __<rank>_0.distcp   DCP: model and optimizer, any mesh can read it (resharding on load)
    train_state.json                progress (samples consumed, position in the epoch's order, steps), the
                                    run's schedule in samples and the settings that fixed it, the data
                                    identity (content digest, corpus size, seed) and the full architecture;
                                    the name predates `Progress`
    rng_rank<r>.pt                  each rank's torch RNG state
    hf/                             HF config.json + tokenizer: export needs nothing else
    commit.json                     written last: size and CRC-32 of every file above (tp2d_exp.checkpoint.store)

Safety rules:
- Every rank writes straight into the final dir; once all have written, every rank reads back and checksums
  its share of the files (each file once; on object storage that is a download) and rank 0 writes
  commit.json. Only then is the checkpoint reported to Ray, so Ray's retention
  (num_to_keep) never deletes the newest intact checkpoint before a newer one is committed.
- A checkpoint dir is never written twice: a step whose dir exists gets `_<n>`. At a start, the dirs of this
  run that were never committed are removed; committed ones stay.
- On resume the driver checks presence, sizes and the small files' checksums; before loading, the ranks
  checksum every file (each file once, spread over the ranks: one extra read of the checkpoint). Whatever
  fails to verify or load, on any rank, makes every rank move to the previous committed checkpoint together,
  with one warning line.
- Progress is stored as global quantities, never per-rank loader state, so any mesh and any global batch
  size resumes it: the next global batch starts at the saved sample of the epoch's order.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

from tp2d_exp.checkpoint.async_save import AsyncWriter
from tp2d_exp.checkpoint.store import (CheckpointError, FileRecord, check_sums, checkpoint_dirs, commit, crc32,
                                       intact_candidates, is_committed, list_files, read_bytes, read_commit,
                                       remove_uncommitted, share, storage_reader, storage_writer,
                                       verify)
from tp2d_exp.config.errors import ConfigError, first_line
from tp2d_exp.config.schedule import FIXED_SETTINGS, Schedule, crossed
from tp2d_exp.config.schema import RunConfig
from tp2d_exp.config.spec import Architecture, JobSpec
from tp2d_exp.data.order import BatchOrder
from tp2d_exp.records import from_dict, to_dict
from tp2d_exp.storage import filesystem, fsync_dir, is_uri, join, write_file

log = logging.getLogger("tp2d_exp.checkpoint")

STATE_FILE = "train_state.json"
HF_DIR = "hf"


class CheckpointMismatch(ConfigError):
    """A checkpoint that does not fit this job (another model, corpus or run settings); never fallen back past."""


@dataclass
class Progress:
    """Training progress, as global quantities any mesh and any global batch size can resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next step
    sample_in_epoch: int = 0  # samples of the epoch's order consumed: the next global batch starts there
    samples_consumed: int = 0  # global samples seen so far
    tokens_consumed: int = 0  # global loss-bearing tokens seen so far
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss (run.nonfinite=skip)

    def advance(self, order: BatchOrder, epoch: int, start: int, tokens: int) -> None:
        """Record that the global batch at sample `start` of `epoch` was trained on."""
        self.step += 1
        self.epoch, self.sample_in_epoch = epoch, start + order.global_batch_size
        if not order.has_batch(self.sample_in_epoch):  # what is left of the epoch is less than a batch
            self.epoch, self.sample_in_epoch = epoch + 1, 0
        self.samples_consumed += order.global_batch_size
        self.tokens_consumed += tokens


@dataclass(frozen=True)
class DataIdentity:
    """The corpus and order a position belongs to: the token data's content digest (a copied or touched
    corpus is the same corpus), its sample count and the order's seed."""

    digest: str
    num_samples: int
    seed: int

    @classmethod
    def of(cls, spec: JobSpec) -> "DataIdentity":
        return cls(spec.resolved.data_digest, spec.resolved.num_samples, spec.run.seed)


@dataclass
class SavedProgress(Progress):
    """train_state.json: the progress plus what resuming it needs."""

    global_batch_size: int = 0  # of the writing job (informative: the position is in samples)
    world_size: int = 0  # of the writing job (per-rank RNG states map onto the same world size only)
    data: Optional[DataIdentity] = None
    schedule: Optional[Schedule] = None  # the run's schedule in samples, fixed at its first start
    settings: dict[str, Any] = field(default_factory=dict)  # the run.* values that fixed it (FIXED_SETTINGS)
    architecture: Optional[Architecture] = None


def due(progress: Progress, before: int, every_samples: int, last: bool) -> bool:
    """Whether to checkpoint after the step just recorded in `progress` (it started after `before` samples):
    at each multiple of `every_samples` it passed, at each epoch end and at the last step."""
    return last or progress.sample_in_epoch == 0 or crossed(every_samples, before, progress.samples_consumed)


@dataclass
class Restored:
    path: str
    progress: Progress


# ---- finding and checking checkpoints before any worker starts (plain files, no process group)


def resolve(resume_from: str, storage_path: str) -> str:
    """The checkpoint dir that `run.resume_from` names: a checkpoint dir, a run dir or a run name under
    `storage_path` (its newest intact checkpoint), each a path or a URI. Raises ConfigError when there is none."""
    local = resume_from if is_uri(resume_from) else os.path.abspath(os.path.expanduser(resume_from))
    for path in dict.fromkeys((local, join(storage_path, resume_from))):
        try:
            if is_committed(path) or _isfile(join(path, ".metadata")):
                verify(path)
                return path
            if checkpoint_dirs(path):
                intact = intact_candidates(path)
                if not intact:
                    raise CheckpointError(f"{path} has no committed checkpoint")
                return intact[0]
        except CheckpointError as e:
            raise ConfigError(f"run.resume_from={resume_from!r}: {e}") from None
    raise ConfigError(f"run.resume_from={resume_from!r} is neither a checkpoint dir, a run dir nor a run "
                      f"name under {storage_path}; give e.g. the `checkpoint` path of a run's summary.json")


def _isfile(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isfile(p)


def read_progress(path: str) -> SavedProgress:
    """A checkpoint's train_state.json; CheckpointError when it is unreadable, CheckpointMismatch when it was
    written by an earlier version (no schedule, data identity or architecture record)."""
    try:
        saved = from_dict(SavedProgress, json.loads(read_bytes(join(path, STATE_FILE))))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {STATE_FILE}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable {STATE_FILE} ({type(e).__name__}: {first_line(e)})") from None
    if saved.schedule is None or saved.data is None or saved.architecture is None:
        raise CheckpointMismatch(f"checkpoint {path} was written by an earlier version of tp2d_exp (its "
                                 f"{STATE_FILE} has no schedule, data identity or architecture); start a new run")
    return saved


@dataclass(frozen=True)
class Start:
    """The checkpoint a job starts from."""

    path: str
    saved: SavedProgress
    own: bool  # the run's own checkpoint (a same-name rerun continues the run), else run.resume_from


def find_start(spec: JobSpec) -> Optional[Start]:
    """The run's own newest intact checkpoint (a same-name rerun), else `run.resume_from`, checked against
    the job before any worker starts: ConfigError when it cannot be found or does not fit (another
    architecture or corpus)."""
    r = spec.resolved
    run_dir = join(r.storage_path, r.run_name)
    try:
        own = intact_candidates(run_dir)
    except CheckpointError as e:
        raise ConfigError(f"run.name={r.run_name!r}: {e}") from None
    start = None
    for path in own:
        try:
            start = Start(path, read_progress(path), own=True)
            break
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    else:
        if own:
            raise ConfigError(f"run.name={r.run_name!r}: no checkpoint of {run_dir} is readable (see above)")
        # Only now: a rerun continues its own checkpoints even when its run.resume_from source is gone.
        resume_from = resolve(spec.run.resume_from, r.storage_path) if spec.run.resume_from else None
        if resume_from:
            try:
                start = Start(resume_from, read_progress(resume_from), own=False)
            except CheckpointError as e:
                raise ConfigError(f"run.resume_from={spec.run.resume_from!r}: {e}") from None
    if start:
        check_architecture(start.path, start.saved, spec.arch)
        check_data(start.path, start.saved, DataIdentity.of(spec))
    return start


def settings_of(run: RunConfig) -> dict[str, Any]:
    return {k: getattr(run, k) for k in FIXED_SETTINGS}


def changed_settings(saved: SavedProgress, run: RunConfig) -> list[str]:
    """`run.key=new (checkpoint: old)` for every fixed setting this job changes. A setting newer than the
    checkpoint (not in its record) is no change: the checkpoint's run had no such choice."""
    return [f"run.{k}={v} (checkpoint: {saved.settings[k]})" for k, v in settings_of(run).items()
            if k in saved.settings and saved.settings[k] != v]


def check_architecture(path: str, saved: SavedProgress, arch: Architecture) -> None:
    """Raise CheckpointMismatch when the architecture (every field, rope included) differs from the
    checkpoint's."""
    diffs = [f"model.{f.name}={getattr(arch, f.name)} (checkpoint: {getattr(saved.architecture, f.name)})"
             for f in fields(Architecture) if getattr(saved.architecture, f.name) != getattr(arch, f.name)]
    if diffs:
        raise CheckpointMismatch(f"checkpoint {path} was written by another model: {', '.join(diffs)}; "
                                 "resume it with the model it was trained with")


def check_data(path: str, saved: SavedProgress, data: DataIdentity) -> None:
    """Raise CheckpointMismatch when the checkpoint's position belongs to another corpus or order."""
    old = saved.data
    diffs = [what for what, differs in (
        (f"the token data differ (digest {data.digest}, checkpoint: {old.digest})", old.digest != data.digest),
        (f"{data.num_samples} samples (checkpoint: {old.num_samples})", old.num_samples != data.num_samples),
        (f"run.seed={data.seed} (checkpoint: {old.seed})", old.seed != data.seed)) if differs]
    if diffs:
        raise CheckpointMismatch(f"checkpoint {path} belongs to another corpus or order: {'; '.join(diffs)}; "
                                 "resume with the data.*, tokenizer and run.seed it was trained with")


def check_fits(path: str, model: nn.Module) -> None:
    """Raise CheckpointMismatch when the checkpoint's model tensors (FQN -> global shape) do not match."""
    try:
        metadata = storage_reader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - a truncated or garbled .metadata
        raise CheckpointError(f"{path}: unreadable .metadata ({type(e).__name__}: {first_line(e)})") from None
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


def _agree(error: Any) -> Any:
    """The first error any rank met (None: none), on every rank: all ranks decide together."""
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _checksum_share(path: str, rank: int, world: int) -> dict[str, FileRecord]:
    """Size and CRC-32 of this rank's share of the files written to `path` (local files are fsynced first:
    DCP syncs its own, this covers the rest)."""
    files, out = list_files(path), {}
    for name in share(files, rank, world):
        full = join(path, name)
        if not is_uri(full):
            with open(full, "rb") as f:
                os.fsync(f.fileno())
        out[name] = FileRecord(size=files[name], crc32=crc32(full))
    return out


@dataclass
class _Pending:
    """A checkpoint whose files are being written (async save): committed once every rank has finished."""

    path: str
    row: Any
    future: Any  # this rank's write + checksums, done in the background


class CheckpointManager:
    """Writes and restores the checkpoints of one run (all ranks); `run_dir` is its run dir under Ray
    storage (a path or a URI). `on_commit(path, row)` is told of every committed checkpoint with the metrics
    row of the step it holds. With `async_save`, DCP writes in the background over a gloo group of its own
    while training goes on (tp2d_exp.checkpoint.async_save)."""

    def __init__(self, spec: JobSpec, model: nn.Module, optimizer: torch.optim.Optimizer, order: BatchOrder,
                 run_dir: str, hf_config: Any, on_commit: Callable[[str, Any], None] = lambda path, row: None,
                 async_save: bool = False):
        self.spec, self.model, self.optimizer, self.order = spec, model, optimizer, order
        self.run_dir, self.hf_config, self.on_commit = run_dir, hf_config, on_commit
        self.writer = AsyncWriter() if async_save else None
        self.pending: Optional[_Pending] = None
        self.stalls: list[float] = []  # seconds each save blocked training
        self._tokenizer = None

    # -- saving

    def save(self, progress: Progress, row: Any) -> None:
        """Checkpoint `progress` (the state after its last step; `row` is that step's metrics row)."""
        self.wait()  # one save in flight at a time (the wait counts as the previous save's stall)
        t0 = time.perf_counter()
        rank, world = dist.get_rank(), dist.get_world_size()
        path, error = self._new_dir(progress.step), None
        try:  # the small files; a rank that fails here must not leave the others waiting in DCP's collectives
            write_file(join(path, f"rng_rank{rank}.pt"), _saved_bytes(_rng_state()))
            if rank == 0:
                self._write_state(path, progress)
        except Exception as e:  # noqa: BLE001 - every rank learns of it; the dir stays uncommitted
            error = f"{type(e).__name__}: {first_line(e)}"
        if error := _agree(error):
            raise CheckpointError(f"checkpoint {path} could not be written: {error}")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.writer is None:
            # Collective; the coordinator writes .metadata only after every rank's shards are written.
            dcp.save(state, storage_writer=storage_writer(path))
            dist.barrier()
            self._commit(path, row, _checksum_share(path, rank, world))
        else:
            written = self.writer.save(state, path, lambda: _checksum_share(path, rank, world))
            self.pending = _Pending(path, row, written)
        self.stalls.append(time.perf_counter() - t0)

    def poll(self) -> None:
        """Commit an async save once every rank has finished writing it (a tiny all-reduce per step while
        one is pending, so that all ranks commit and report at the same step)."""
        if self.pending is None:
            return
        # On the training device and the default group (NCCL takes device tensors only); the writer's own
        # group is busy with the write's collectives in the background thread.
        done = torch.tensor([int(self.pending.future.done())], device=next(self.model.parameters()).device)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            self.wait()

    def wait(self) -> None:
        """Block until the pending save (if any) is written, then commit it."""
        if self.pending is None:
            return
        t0 = time.perf_counter()
        pending, self.pending = self.pending, None
        try:
            files, error = pending.future.result(), None
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, not only the one that failed
            files, error = {}, f"{type(e).__name__}: {first_line(e)}"
        if error := _agree(error):
            raise CheckpointError(f"async save of {pending.path} failed: {error}")
        self._commit(pending.path, pending.row, files)
        if self.stalls:
            self.stalls[-1] += time.perf_counter() - t0  # waiting is training time lost to the save too

    def close(self) -> None:
        self.wait()
        if self.writer is not None:
            self.writer.close()

    def _new_dir(self, step: int) -> str:
        picked: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                taken = {p.rsplit("/", 1)[-1] for p in checkpoint_dirs(self.run_dir)}
                name, n = f"checkpoint_{step:07d}", 0
                while name in taken:  # a dir left by an earlier attempt: never written twice
                    n += 1
                    name = f"checkpoint_{step:07d}_{n}"
                picked = [join(self.run_dir, name)]
                if not is_uri(picked[0]):
                    os.makedirs(picked[0])
                    fsync_dir(self.run_dir)
            except Exception as e:  # noqa: BLE001 - sent to every rank, which all raise it
                picked = [CheckpointError(f"no checkpoint dir in {self.run_dir}: {type(e).__name__}: {first_line(e)}")]
        dist.broadcast_object_list(picked, src=0)
        if isinstance(picked[0], Exception):
            raise picked[0]
        return picked[0]

    def _write_state(self, path: str, progress: Progress) -> None:
        spec = self.spec
        saved = SavedProgress(**{f.name: getattr(progress, f.name) for f in fields(Progress)},
                              global_batch_size=self.order.global_batch_size, world_size=dist.get_world_size(),
                              data=DataIdentity.of(spec), schedule=spec.resolved.schedule,
                              settings=settings_of(spec.run), architecture=spec.arch)
        write_file(join(path, STATE_FILE), json.dumps(to_dict(saved), indent=2).encode())
        with tempfile.TemporaryDirectory() as tmp:
            from tp2d_exp.data.tokenizer import load_tokenizer

            self.hf_config.save_pretrained(tmp)
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(spec.resolved.tokenizer_dir)
            self._tokenizer.save_pretrained(tmp)
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    write_file(join(path, HF_DIR, name), f.read())

    def _commit(self, path: str, row: Any, files: dict[str, FileRecord]) -> None:
        shares: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, files)
        if dist.get_rank() == 0:
            if not is_uri(path):
                fsync_dir(path)
            commit(path, {k: v for s in shares for k, v in s.items()})
        dist.barrier()  # nobody reports (and lets Ray delete older ones) before the commit
        self.on_commit(path, row)

    # -- restoring

    def load(self, path: str) -> Progress:
        """Load a checkpoint written under any mesh and global batch size. Raises CheckpointError on every
        rank when any rank finds a file that does not match its checksum or cannot be read."""
        saved, error = None, None
        try:  # checksums first, so that nothing below reads a corrupt file
            committed = read_commit(path)
            check_sums(path, committed, share(committed.files, dist.get_rank(), dist.get_world_size()))
            check_fits(path, self.model)
            saved = read_progress(path)
            check_data(path, saved, DataIdentity.of(self.spec))
        except CheckpointMismatch as e:  # the job does not fit it: refused, not fallen back past
            error = ("mismatch", str(e))
        except Exception as e:  # noqa: BLE001 - one rank's read error (a corrupt file, a flaky store) is everyone's
            error = ("error", str(e) if isinstance(e, CheckpointError)
                     else f"{path}: {type(e).__name__}: {first_line(e)}")
        if agreed := _agree(error):
            kind, message = agreed
            raise (CheckpointMismatch if kind == "mismatch" else CheckpointError)(message)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(sd, storage_reader=storage_reader(path))
        except Exception as e:  # noqa: BLE001 - DCP gathers every rank's read error; all ranks land here
            raise CheckpointError(f"{path} could not be read: {type(e).__name__}: {first_line(e)}") from None
        # The optimizer state comes from the checkpoint, its hyperparameters from this job: a run.resume_from
        # with another weight decay or betas uses them (the LR is set every step from the schedule).
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        for group, values in zip(self.optimizer.param_groups, hyper):
            group.update(values)
        self._restore_rng(path, saved)
        return Progress(**{f.name: getattr(saved, f.name) for f in fields(Progress)})

    def _restore_rng(self, path: str, saved: SavedProgress) -> None:
        if saved.world_size != dist.get_world_size():  # per-rank streams do not map onto another world size
            log.info("RNG state not restored: written by %d ranks, resumed by %d", saved.world_size,
                     dist.get_world_size())
            return
        rng, error = None, None
        try:
            rng = torch.load(io.BytesIO(read_bytes(join(path, f"rng_rank{dist.get_rank()}.pt"))), weights_only=True)
        except Exception as e:  # noqa: BLE001 - a garbled file; every rank falls back together
            error = f"{path}: rng_rank{dist.get_rank()}.pt could not be read ({type(e).__name__})"
        if error := _agree(error):
            raise CheckpointError(error)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    def restore(self, resume_from: Optional[str]) -> Optional[Restored]:
        """Load the run's newest intact checkpoint, else `resume_from` (a checkpoint dir), else nothing.
        Rank 0 removes the run's uncommitted dirs and picks the candidates, so every rank tries the same ones
        in the same order."""
        picked: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                for path in remove_uncommitted(self.run_dir):
                    log.warning("removed %s: never committed (an attempt died while writing it)", path)
                own = intact_candidates(self.run_dir, checksum_below=0)  # load checksums every file
                picked = [own or ([resume_from] if resume_from else [])]
            except Exception as e:  # noqa: BLE001 - every rank must raise it, not only rank 0
                picked = [e if isinstance(e, CheckpointError) else
                          CheckpointError(f"{self.run_dir}: {type(e).__name__}: {first_line(e)}")]
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


def _saved_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()

def load_model_state(path: str) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a checkpoint, read in this process without a process group:
    tensors of the saved global shapes, filled by DCP (which reassembles every rank's shards). Every file is
    checksummed first: a tool reads the whole checkpoint anyway."""
    verify(path, checksum_below=1 << 62)
    metadata = storage_reader(path).read_metadata()
    model = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load({"model": model}, storage_reader=storage_reader(path), no_dist=True)
    return model
