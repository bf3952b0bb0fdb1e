"""The token store: a source's documents tokenized once per (source, tokenizer, seq_length, packing,
dataset_percentage, val_fraction) into memory-mapped sample files that every run and every rank reuses.

Layout of one store (a dir named by its fingerprint under `data.store_dir`, default outputs/cache/stores):

    meta.json      tokenizer identity, dtype, seq_length, packing, pad/eos ids, per split: samples, tokens,
                   documents, content digest; how and how fast it was built
    train.bin      [samples, seq_length] token ids, uint16 when the vocab fits 16 bits, else uint32
    train.len      [samples] int32 real tokens per sample (padded stores only; packed samples are full)
    heldout.bin    the same for data.val_fraction's documents (and heldout.len)

Why flat numpy files and not Arrow, MDS or LitData: a sample is one fixed-size row, so `np.memmap` gives
O(1) random access with no index and no decode step, the pages are the OS page cache (shared by every rank
of a node, never private memory), and nothing beyond numpy is needed to read it.

A build is atomic: it writes into a hidden sibling dir and renames it into place after everything is
fsynced, so a store that exists is whole, and a crashed build leaves only a temp dir the next build removes.
Packing runs over the whole document stream in corpus order (not per shard), so the content, and its
digest, do not depend on how the tokenizing was split up: one core, all cores, or Ray Data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from tp2d_exp.config.errors import ConfigError
from tp2d_exp.data.batch import Batch
from tp2d_exp.data.encode import Part
from tp2d_exp.storage import file_lock, fsync_dir

log = logging.getLogger(__name__)

STORE_VERSION = 1
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Layout:
    """What fixes a store's bytes besides its documents."""

    seq_length: int
    packing: bool
    dataset_percentage: float
    val_fraction: float


@dataclass
class SplitInfo:
    samples: int = 0
    tokens: int = 0  # real (non-padding) tokens in the samples
    documents: int = 0
    digest: str = ""


@dataclass
class StoreMeta:
    version: int
    source: str
    tokenizer: str  # tokenizer_identity(): a digest of its vocab, merges and normalisation
    vocab_size: int
    dtype: str
    seq_length: int
    packing: bool
    pad_id: int
    eos_id: int
    splits: dict[str, SplitInfo]
    build_s: float = 0.0
    built_by: str = ""  # "local, N processes" or "ray data"
    documents: int = 0
    reused: bool = field(default=False, metadata={"not_saved": True})

    @classmethod
    def read(cls, path: Path) -> "StoreMeta":
        raw = json.loads(path.read_text())
        raw["splits"] = {k: SplitInfo(**v) for k, v in raw["splits"].items()}
        return cls(**raw)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_identity(tokenizer: Any) -> str:
    """What the tokenizer does, not where it came from: the same tokenizer from a hub id or a local copy has
    one identity; a changed vocab, merge list or normaliser another, and so does another EOS or pad token
    (tokenizer_config.json may name them: a chat variant's EOS differs from its base model's)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += f"/eos={tokenizer.eos_token_id}/pad={tokenizer.pad_token_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(source: dict[str, Any], tokenizer: str, layout: Layout) -> str:
    parts = {"version": STORE_VERSION, "source": source, "tokenizer": tokenizer, **asdict(layout)}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SplitWriter:
    """Writes one split's samples as documents stream in, in order; hashes what it writes."""

    def __init__(self, path: Path, seq_length: int, packing: bool, dtype: np.dtype, pad_id: int, eos_id: int):
        self.path, self.seq, self.packing, self.dtype = path, seq_length, packing, dtype
        self.pad, self.eos = pad_id, eos_id
        self.ids = open(path.with_suffix(".bin"), "wb")
        self.lens = None if packing else open(path.with_suffix(".len"), "wb")
        self.hash_ids, self.hash_lens = hashlib.sha256(), hashlib.sha256()
        self.carry = np.zeros(0, dtype)
        self.info = SplitInfo()

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.info.documents += len(lengths)
        if self.packing:
            # Documents joined by EOS and cut into seq_length blocks; only the final partial block is dropped.
            stream = np.concatenate([self.carry, np.insert(tokens, np.cumsum(lengths, dtype=np.int64),
                                                           np.array(self.eos, self.dtype))])
            n = len(stream) // self.seq
            self._write(stream[:n * self.seq], np.full(n, self.seq, np.int32))
            self.carry = stream[n * self.seq:].copy()
        else:
            # The tutorial's recipe: one document per sample, truncated and padded; 1-token documents have
            # nothing to predict.
            starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
            kept = lengths >= 2
            starts, cut = starts[kept], np.minimum(lengths[kept], self.seq).astype(np.int32)
            cols = np.arange(self.seq)
            for i in range(0, len(cut), 1024):  # bounded: a part of short documents holds tens of thousands
                s, c = starts[i:i + 1024], cut[i:i + 1024]
                mask = cols[None, :] < c[:, None]
                rows = np.full((len(c), self.seq), self.pad, self.dtype)
                rows[mask] = tokens[(s[:, None] + cols[None, :])[mask]]
                self._write(rows.reshape(-1), c)

    def _write(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        data = np.ascontiguousarray(ids, self.dtype).tobytes()
        self.ids.write(data)
        self.hash_ids.update(data)
        if self.lens is not None:
            self.lens.write(lengths.astype(np.int32).tobytes())
            self.hash_lens.update(lengths.astype(np.int32).tobytes())
        self.info.samples += len(lengths)
        self.info.tokens += int(lengths.sum())

    def close(self) -> SplitInfo:
        for f in (self.ids, self.lens):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        shape = f"{self.info.samples}x{self.seq}/{'packed' if self.packing else 'padded'}"
        self.info.digest = hashlib.sha256(
            f"{shape}/{self.hash_ids.hexdigest()}/{self.hash_lens.hexdigest()}".encode()).hexdigest()[:32]
        return self.info


def write_splits(parts: list[Part], out: Path, meta: StoreMeta, val_fraction: float) -> dict[str, SplitInfo]:
    """Stream the tokenized parts, in order, into the train and held-out splits: the last
    ceil(val_fraction * documents) documents are held out, whole (a contiguous tail, so neighbouring
    paragraphs of one article stay on one side and the held-out loss is not flattered by near-copies)."""
    total = sum(p.documents for p in parts)
    held = math.ceil(total * val_fraction) if val_fraction > 0 else 0
    boundary = total - held
    dtype = np.dtype(meta.dtype)
    writers = {s: SplitWriter(out / s, meta.seq_length, meta.packing, dtype, meta.pad_id, meta.eos_id)
               for s in (SPLITS if held else SPLITS[:1])}
    at = 0
    for part in parts:
        tokens = np.fromfile(part.path + ".tok", dtype)
        lengths = np.fromfile(part.path + ".len", np.uint32)
        k = min(max(boundary - at, 0), len(lengths))
        cut = int(lengths[:k].sum())
        if k:
            writers["train"].add(tokens[:cut], lengths[:k])
        if k < len(lengths):
            writers["heldout"].add(tokens[cut:], lengths[k:])
        at += len(lengths)
        for suffix in (".tok", ".len"):
            os.remove(part.path + suffix)  # the disk holds the parts and the store at once only part by part
    return {s: w.close() for s, w in writers.items()}


def install(tmp: Path, final: Path, meta: StoreMeta) -> None:
    """Commit a built store: meta.json last, every file fsynced, then one rename."""
    (tmp / "meta.json").write_text(json.dumps(
        {k: v for k, v in asdict(meta).items() if k != "reused"}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(str(tmp))
    os.replace(tmp, final)
    fsync_dir(str(final.parent))


class TokenStore:
    """One split of a store, memory-mapped: samples of exactly seq_length tokens; `lengths[i]` real tokens at
    the start of sample i, padding after (packed: every length is seq_length)."""

    def __init__(self, path: Path, split: str = "train", meta: Optional[StoreMeta] = None):
        self.path, self.split = Path(path), split
        self.meta = meta or StoreMeta.read(self.path / "meta.json")
        self.info = self.meta.splits[split]
        seq, n = self.meta.seq_length, self.info.samples
        ids_file = self.path / f"{split}.bin"
        # mode "r": the pages stay the page cache's, shared by every process that maps the file.
        self.ids = np.memmap(ids_file, np.dtype(self.meta.dtype), "r", shape=(n, seq)) if n else \
            np.zeros((0, seq), np.dtype(self.meta.dtype))
        self.lengths = None if self.meta.packing or not n else \
            np.memmap(self.path / f"{split}.len", np.int32, "r", shape=(n,))

    def __len__(self) -> int:
        return self.info.samples

    @property
    def digest(self) -> str:
        return self.info.digest

    @property
    def pad_id(self) -> int:
        return self.meta.pad_id

    @property
    def eos_id(self) -> int:
        return self.meta.eos_id

    @property
    def input_ids(self) -> torch.Tensor:
        """All samples as one [N, seq_length] int64 tensor: a copy, for small stores and tests only."""
        return torch.from_numpy(np.asarray(self.ids, np.int64))

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        ids = np.asarray(self.ids[idx], np.int64)  # reads only these rows' pages
        lengths = np.full(len(idx), self.meta.seq_length, np.int64) if self.lengths is None else \
            np.asarray(self.lengths[idx], np.int64)
        return ids, lengths

    def batch(self, indices: torch.Tensor, epoch: int = 0) -> Batch:
        """The samples at `indices` (a store's samples are the same in every epoch; a mixture's are not)."""
        return Batch.of(*self.rows(np.asarray(indices)))


def open_store(path: Path, split: str, tokenizer: str, key: str) -> TokenStore:
    """A built store, refused when another tokenizer wrote it: its token ids would mean other text."""
    meta = StoreMeta.read(path / "meta.json")
    if meta.version != STORE_VERSION:
        raise ConfigError(f"{key}: the token store {path} has format version {meta.version}, this code reads "
                          f"{STORE_VERSION}; delete it (it is rebuilt) or point data.store_dir elsewhere")
    if meta.tokenizer != tokenizer:
        raise ConfigError(f"{key}: the token store {path} was written by another tokenizer (identity "
                          f"{meta.tokenizer}, this run's: {tokenizer}); use the tokenizer it was built with, or "
                          "let this run build its own store (another data.store_dir)")
    if split not in meta.splits:
        raise ConfigError(f"{key}: the token store {path} has no {split} split (splits: {list(meta.splits)}); "
                          "build it with data.val_fraction > 0")
    return TokenStore(path, split, meta)


def build_dir(root: Path, fp: str) -> Path:
    """A fresh temp dir for building store `fp`, after removing any a crashed build left (the caller holds
    the store's lock, so no other build is writing them)."""
    for stale in root.glob(f".{fp}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{fp}.building-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def lock(root: Path, fp: str):
    return file_lock(root / f".{fp}.lock")

