"""Checkpoint files on a local/shared path or on object storage (s3://, gs://, ... through fsspec): listing,
committing, verifying, removing what was never committed. Plain file operations, no process group: the
driver, the workers and the tools all use these.

commit.json is written last and lists every file of the checkpoint with its size and CRC-32. On a POSIX path
every file is fsynced before it; on object storage an object exists only once its upload completed, and
commit.json is uploaded after every shard. A checkpoint without commit.json never counts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from tp2d_exp.records import from_dict, to_dict
from tp2d_exp.storage import filesystem, is_uri, join, write_file

log = logging.getLogger("tp2d_exp.checkpoint")

COMMIT_FILE = "commit.json"
DIR_RE = re.compile(r"^checkpoint_(\d+)(?:_(\d+))?$")
SMALL_FILE = 4 << 20  # files the driver checksums (progress, RNG, config, DCP metadata); shards are bigger


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or corrupt; the message is one line. Resume falls back past it."""


@dataclass(frozen=True)
class FileRecord:
    size: int
    crc32: int


@dataclass
class Commit:
    """commit.json, written last: every file of the checkpoint, relative to its dir."""

    files: dict[str, FileRecord]


def crc32(path: str) -> int:
    fs, p = filesystem(path)
    crc = 0
    with fs.open(p, "rb") as f:
        while block := f.read(8 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def checkpoint_dirs(run_dir: str) -> list[str]:
    """Checkpoint dirs of a run dir, newest first (by step, then by rewrite suffix)."""
    fs, root = filesystem(run_dir)
    if not fs.isdir(root):
        return []
    found = []
    for entry in fs.ls(root, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if (m := DIR_RE.match(name)) and entry["type"] == "directory":
            found.append((int(m[1]), int(m[2] or 0), join(run_dir, name)))
    return [p for *_, p in sorted(found, reverse=True)]


def list_files(path: str) -> dict[str, int]:
    """Every file under a checkpoint dir, relative name -> size."""
    fs, root = filesystem(path)
    return {os.path.relpath(name, root): int(info["size"])
            for name, info in fs.find(root, detail=True).items() if info["type"] == "file"}


def is_committed(path: str) -> bool:
    fs, p = filesystem(join(path, COMMIT_FILE))
    return fs.isfile(p)


def read_commit(path: str) -> Commit:
    fs, p = filesystem(join(path, COMMIT_FILE))
    try:
        with fs.open(p, "rb") as f:
            return from_dict(Commit, json.loads(f.read()))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {COMMIT_FILE}: not every rank finished writing it") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable {COMMIT_FILE} ({type(e).__name__}: {e})") from None


def verify(path: str, checksum_below: int = SMALL_FILE) -> Commit:
    """Raise CheckpointError unless every committed file is there with its size, and the files smaller than
    `checksum_below` bytes also with their CRC-32: cheap enough for the driver on a 100 GB checkpoint (the
    ranks check the shards as they load them, tp2d_exp.checkpoint.manager)."""
    commit = read_commit(path)
    sizes = list_files(path)
    for name, want in sorted(commit.files.items()):
        size = sizes.get(name)
        if size != want.size:
            what = "is missing" if size is None else f"has {size} of its {want.size} bytes"
            raise CheckpointError(f"{path} is corrupt: {name} {what}")
    check_sums(path, commit, [n for n, f in commit.files.items() if f.size < checksum_below])
    return commit


def check_sums(path: str, commit: Commit, names: Iterable[str]) -> None:
    for name in sorted(names):
        if crc32(join(path, name)) != commit.files[name].crc32:
            raise CheckpointError(f"{path} is corrupt: {name} does not match its committed checksum")


def share(names: Iterable[str], rank: int, world_size: int) -> list[str]:
    """This rank's share of a checkpoint's files for checksumming: every file once, spread over the ranks."""
    return sorted(names)[rank::world_size]


def commit(path: str, files: dict[str, FileRecord]) -> None:
    """Write commit.json (once every rank's files are written and checksummed)."""
    write_file(join(path, COMMIT_FILE), json.dumps(to_dict(Commit(files=files)), indent=1, sort_keys=True).encode())


def intact_candidates(run_dir: str, checksum_below: int = SMALL_FILE) -> list[str]:
    """Committed checkpoints of a run dir that pass `verify`, newest first; each one skipped is reported in
    one line. The workers pass 0 (sizes only): their ranks checksum every file before loading. Raises
    CheckpointError when checkpoints were committed but none is intact (starting over would silently lose
    the run)."""
    committed, intact = 0, []
    for path in checkpoint_dirs(run_dir):
        if not is_committed(path):
            continue  # an attempt that died while writing; removed at the next start (remove_uncommitted)
        committed += 1
        try:
            verify(path, checksum_below)
            intact.append(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    if committed and not intact:
        raise CheckpointError(f"{run_dir} has {committed} committed checkpoint(s) but none is intact; "
                              "delete the run dir to start over (keep more with run.num_to_keep)")
    return intact


def remove_uncommitted(run_dir: str) -> list[str]:
    """Delete the checkpoint dirs of a run that were never committed (an attempt died while writing them):
    they can never be resumed. Committed ones stay, reported to Ray or not. Call at a start only, never while
    an attempt of the run may still be writing."""
    removed = []
    for path in checkpoint_dirs(run_dir):
        if not is_committed(path):
            fs, p = filesystem(path)
            fs.rm(p, recursive=True)
            removed.append(path)
    return removed


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return f.read()


# DCP's fsspec reader and writer live in a private torch module; they are imported here and nowhere else.


def storage_reader(path: str) -> Any:
    """DCP's reader for a checkpoint dir: the file-system one, or fsspec's for a URI."""
    from torch.distributed.checkpoint import FileSystemReader

    if not is_uri(path):
        return FileSystemReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(path)


def storage_writer(path: str) -> Any:
    """DCP's writer for a checkpoint dir. A local one fsyncs every shard and .metadata; on object storage an
    upload is whole once it completes, and sync_files would fall back to a machine-wide os.sync() per file
    (an s3fs stream has no fileno)."""
    from torch.distributed.checkpoint import FileSystemWriter

    if not is_uri(path):
        return FileSystemWriter(path, sync_files=True)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(path, sync_files=False)


def download(path: str, local_dir: str) -> Optional[str]:
    """Copy a checkpoint's sub dir (e.g. hf/) to a local dir, for tools that need files on disk; the local
    path itself when it already is one."""
    if not is_uri(path):
        return path
    fs, p = filesystem(path)
    fs.get(p.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
    return local_dir
