"""Building a token store (tp2d_exp.data.store): documents stream from the source, are tokenized in parallel
into parts, and the parts are packed, in order, into the store.

- Locally, a pool of processes (one per core this process may run on, `os.sched_getaffinity`) tokenizes
  batches of documents; the driver reads the source and keeps at most two batches per process in flight, so
  memory stays flat in corpus size.
- Attached to a Ray cluster, file sources are tokenized by Ray Data (`read_text` / `read_json` /
  `read_parquet` -> `map_batches`), in order (`preserve_order`), each batch writing its part on the store's
  (shared) filesystem.

Either way the parts go through the same `write_splits`, so both give the same bytes and digest.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import current_process, get_context
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tp2d_exp.config.errors import ConfigError, first_line
from tp2d_exp.config.schema import DataSource
from tp2d_exp.data.sources import Source, count_documents, documents
from tp2d_exp.data.encode import Part, RayTokenizer, start_worker, tokenize_part
from tp2d_exp.data.store import (Layout, StoreMeta, build_dir, fingerprint, install, lock, open_store, token_dtype,
                                 write_splits)

log = logging.getLogger(__name__)

def store_path(src: Source, tokenizer: str, layout: Layout, root: Path) -> Path:
    return root / fingerprint(src.fingerprint(), tokenizer, layout)


def ensure_store(src: Source, tok: Any, layout: Layout, root: Path, *, on_ray: bool = False,
                 workers: int = 0, progress: bool = True) -> tuple[Path, StoreMeta]:
    """The store of `src` under `root`, tokenized by `tok` (a loaded tokenizer: the driver loads it once for
    all its sources), built unless it exists (`meta.reused` says which)."""
    if getattr(current_process(), "_inheriting", False):
        # A spawned tokenizer process re-imports its parent's main module; a script that builds at import
        # time would wait forever on the lock its parent holds (multiprocessing's own check comes too late).
        raise RuntimeError("a token store build was started while a tokenizer process was importing the main "
                           "module: call it under `if __name__ == '__main__':`")
    from tp2d_exp.data.store import tokenizer_identity

    identity = tokenizer_identity(tok)
    path = store_path(src, identity, layout, root)
    if not (path / "meta.json").exists():
        with lock(root, path.name):
            if not (path / "meta.json").exists():
                shutil.rmtree(path, ignore_errors=True)  # a store dir without its meta.json is not a store
                meta = _build(src, tok, identity, layout, path, on_ray, workers, progress)
                return path, meta
    meta = open_store(path, "train", identity, src.key).meta
    meta.reused = True
    return path, meta


def _build(src: Source, tok: Any, identity: str, layout: Layout, path: Path, on_ray: bool,
           workers: int, progress: bool) -> StoreMeta:
    t0 = time.perf_counter()
    tmp = build_dir(path.parent, path.name)
    vocab = len(tok)
    meta = StoreMeta(version=1, source=src.name, tokenizer=identity, vocab_size=vocab,
                     dtype=str(token_dtype(vocab)), seq_length=layout.seq_length, packing=layout.packing,
                     pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, splits={})
    try:
        limit = None
        if layout.dataset_percentage < 100:
            limit = math.ceil(count_documents(src) * layout.dataset_percentage / 100)
        parts_dir = tmp / "parts"
        parts_dir.mkdir()
        if on_ray and src.kind is DataSource.text_files:
            parts, meta.built_by = _tokenize_on_ray(src, tok, meta.dtype, parts_dir, limit), "ray data"
        else:
            n = workers or len(os.sched_getaffinity(0))
            parts, meta.built_by = _tokenize_locally(src, tok, meta.dtype, parts_dir, limit, n, progress)
        meta.documents = sum(p.documents for p in parts)
        meta.splits = write_splits(parts, tmp, meta, layout.val_fraction)
        shutil.rmtree(parts_dir)  # with whatever a retried Ray task left
        meta.build_s = round(time.perf_counter() - t0, 3)
        install(tmp, path, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written store
        raise
    train = meta.splits["train"]
    log.info("token store %s: %d tokens in %d samples (%d documents) built in %.1f s (%.0f tokens/s, %s)",
             path, train.tokens, train.samples, meta.documents, meta.build_s, train.tokens / max(meta.build_s, 1e-9),
             meta.built_by)
    return meta


# --- local: a process pool ---------------------------------------------------------------------------------

class Progress:
    """Documents/s and tokens/s on stderr while a store builds (tqdm; quiet when stderr is not a terminal
    unless TP2D_PROGRESS=1)."""

    def __init__(self, name: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(desc=f"tokenizing {name}", unit=" docs", unit_scale=True, file=sys.stderr, mininterval=1,
                        disable=not enabled or not (sys.stderr.isatty() or os.environ.get("TP2D_PROGRESS")))
        self.t0, self.tokens = time.perf_counter(), 0

    def update(self, part: Part) -> None:
        self.tokens += part.tokens
        self.bar.update(part.documents)
        self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):,.0f} tokens/s",
                                 refresh=False)

    def close(self) -> None:
        self.bar.close()


def _tokenize_locally(src: Source, tok: Any, dtype: str, tmp: Path, limit: Optional[int],
                      processes: int, progress: bool) -> tuple[list[Part], str]:
    bar = Progress(src.name, progress)
    batches = documents(src, limit)
    head = list(itertools.islice(batches, 2))
    parts: list[Part] = []
    try:
        backend = getattr(tok, "backend_tokenizer", None)
        if processes <= 1 or len(head) < 2 or backend is None:  # one core, one batch, or a slow tokenizer
            for i, texts in enumerate(itertools.chain(head, batches)):
                parts.append(tokenize_part(texts, str(tmp / f"part-{i:07d}"), dtype, tok))
                bar.update(parts[-1])
            return parts, "local, 1 process"
        # spawn, not fork: the driver may hold threads (Ray's, W&B's) that a forked child would inherit mid-lock.
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn"), initializer=start_worker,
                                 initargs=(backend.to_str(),)) as pool:
            pending: deque[Future] = deque()
            for i, texts in enumerate(itertools.chain(head, batches)):
                pending.append(pool.submit(tokenize_part, texts, str(tmp / f"part-{i:07d}"), dtype))
                while len(pending) >= 2 * processes:  # bounded: the reader never runs far ahead
                    parts.append(pending.popleft().result())
                    bar.update(parts[-1])
            while pending:
                parts.append(pending.popleft().result())
                bar.update(parts[-1])
        return parts, f"local, {processes} processes"
    finally:
        bar.close()


# --- attached: Ray Data ------------------------------------------------------------------------------------

def _tokenize_on_ray(src: Source, tok: Any, dtype: str, tmp: Path, limit: Optional[int]) -> list[Part]:
    if json := [f for f in src.files if f.endswith(".json")]:
        raise ConfigError(f"{src.key}.path={src.path!r}: {json[0]} is a .json file, which Ray Data does not read "
                          "here; use .jsonl or .parquet on a cluster, or build the store without cluster.address")
    try:
        parts = _ray_parts(src, tok, dtype, tmp)
    except ConfigError:
        raise
    except Exception as e:  # raised inside Ray tasks: one line, naming the source, not Ray's task traceback
        cause = getattr(e, "cause", None) or e
        raise ConfigError(f"{src.key}.path={src.path!r}: Ray Data could not tokenize it ({type(cause).__name__}: "
                          f"{first_line(cause)}); check that every file is UTF-8 and every row has "
                          f"{src.key}.text_field={src.text_field!r}") from e
    return _cut(parts, limit, np.dtype(dtype))


def _ray_parts(src: Source, tok: Any, dtype: str, tmp: Path) -> list[Part]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the parts come back in corpus order
    ctx.enable_progress_bars = False
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    parts: list[Part] = []
    # Runs of files of one format are read by one Ray Data reader each, in corpus order.
    for suffix, group in itertools.groupby(src.files, key=lambda f: Path(f).suffix):
        files = list(group)
        if suffix == ".txt":
            ds = ray.data.read_text(files, drop_empty_lines=True)
            field = "text"
        elif suffix == ".parquet":
            ds, field = ray.data.read_parquet(files, columns=[src.text_field]), src.text_field
        else:  # .jsonl: pyarrow's reader keeps JSON strings strings (lines=True would let pandas turn "2019" into 2019)
            ds, field = ray.data.read_json(files), src.text_field
        # The tokenizer travels as its JSON: the nodes need not see the driver's tokenizer dir.
        ds = ds.map_batches(RayTokenizer, fn_constructor_kwargs=dict(tokenizer_json=tok.backend_tokenizer.to_str(),
                                                                     text_field=field, dtype=dtype, out=str(tmp)),
                            batch_size=4096, batch_format="numpy", concurrency=(1, workers), num_cpus=1)
        for row in ds.iter_rows():
            parts.append(Part(str(row["path"]), int(row["documents"]), int(row["tokens"])))
    return parts


def _cut(parts: list[Part], limit: Optional[int], dtype: np.dtype) -> list[Part]:
    """The parts holding the first `limit` documents (data.dataset_percentage), the last one cut."""
    if limit is None:
        return parts
    out, left = [], limit
    for p in parts:
        if left <= 0:
            for suffix in (".tok", ".len"):
                os.remove(p.path + suffix)
            continue
        if p.documents > left:
            lengths = np.fromfile(p.path + ".len", np.uint32)[:left]
            tokens = np.fromfile(p.path + ".tok", dtype)[:int(lengths.sum())]
            tokens.tofile(p.path + ".tok")
            lengths.tofile(p.path + ".len")
            p = Part(p.path, left, len(tokens))
        out.append(p)
        left -= p.documents
    return out
