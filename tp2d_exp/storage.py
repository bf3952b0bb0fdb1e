"""Files the driver and workers share: atomic writes, cross-process locks, and paths that may be URIs
(object storage through fsspec: s3:// needs s3fs; the endpoint comes from AWS_ENDPOINT_URL or the usual
AWS config)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def is_uri(path: str) -> bool:
    """s3://, gs://, abfss://, ...: storage Ray reaches through pyarrow, the same from every node."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path))


def filesystem(path: str) -> tuple[Any, str]:
    """The fsspec filesystem of a path or URI and the path inside it."""
    from fsspec.core import url_to_fs

    return url_to_fs(path)


def open_file(path: str, mode: str = "rb", **kwargs: Any) -> Any:
    """A local file or an object (fsspec) opened alike; text modes take encoding/newline as open() does."""
    if is_uri(path):
        import fsspec

        return fsspec.open(path, mode, **kwargs).open()
    return open(path, mode, **kwargs)


def file_version(path: str) -> tuple[int, str]:
    """(size, a version tag) of a local file (its mtime) or an object (its ETag, else its modification time):
    what tells a changed file from the same one without reading it."""
    if is_uri(path):
        fs, p = filesystem(path)
        info = fs.info(p)
        return int(info.get("size") or 0), str(info.get("ETag") or info.get("LastModified") or info.get("mtime"))
    st = os.stat(path)
    return st.st_size, str(st.st_mtime)


def join(base: str, *names: str) -> str:
    """Join onto a local path or a URI alike (pathlib would turn s3://b into s3:/b)."""
    return "/".join([base.rstrip("/"), *names]) if is_uri(base) else os.path.join(base, *names)


def write_file(path: str, data: bytes) -> None:
    """Write a whole file durably. A local file is written beside its final name, fsynced, renamed into place
    and its dir fsynced, so a crash leaves the old file or the new one; an object store's upload is whole or
    absent by itself."""
    if is_uri(path):
        fs, p = filesystem(path)
        fs.pipe_file(p, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
