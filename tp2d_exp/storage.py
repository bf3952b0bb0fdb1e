"""Files the driver and workers share: atomic writes, cross-process locks, and telling URIs from paths."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def is_uri(path: str) -> bool:
    """s3://, gs://, abfss://, ...: storage Ray reaches through pyarrow, the same from every node."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path))


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write (a file or a dir), renamed onto `path` only when the block
    succeeds: readers see the old content or the whole new one, never a partial write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Cross-process lock, so that concurrent workers on one node build a cached artefact once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
