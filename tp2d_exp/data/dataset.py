"""Samples: load documents, tokenize, pack (or pad) into seq_length blocks, cache on disk. What order they
are trained in is tp2d_exp.data.order's job."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Sequence

import torch

from tp2d_exp.config.errors import ConfigError, first_line
from tp2d_exp.config.schema import DataConfig, DataSource
from tp2d_exp.data import synthetic
from tp2d_exp.data.tokenizer import load_tokenizer
from tp2d_exp.storage import atomic_write, file_lock

CACHE_VERSION = 3  # 2: the EOS id travels with the samples; 3: and their content digest
IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, seq_length]
    attention_mask: torch.Tensor  # 1 on real tokens, 0 on padding
    labels: torch.Tensor  # input_ids with padding set to IGNORE_INDEX (the shift happens in the loss)


@dataclass
class TokenizedDataset:
    """Samples of exactly seq_length tokens; `lengths[i]` real tokens at the start of sample i, padding
    after (packing: every length is seq_length)."""

    input_ids: torch.Tensor  # [N, seq_length] int32
    lengths: torch.Tensor  # [N] int32
    pad_id: int
    eos_id: int  # ends every document in a packed block
    digest: str  # of the token data (content_digest): what a checkpoint's position belongs to

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices: torch.Tensor) -> Batch:
        ids = self.input_ids[indices].long()
        positions = torch.arange(ids.shape[1])
        mask = positions[None, :] < self.lengths[indices].long()[:, None]
        return Batch(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, IGNORE_INDEX))


def document_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each token's position inside its document: 0 at the start of a row and after every EOS."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos_id
    return positions - torch.where(starts, positions, 0).cummax(dim=1).values


def load_documents(data: DataConfig, files: Sequence[str] = ()) -> list[str]:
    """The corpus as a list of non-empty documents, cut to `dataset_percentage` (first share, stable).
    `files`: a text_files corpus's files (JobSpec.resolved.data_files)."""
    if data.source is DataSource.synthetic:
        docs = synthetic.documents(data.synthetic_documents, seed=0)
    else:
        import datasets

        datasets.disable_progress_bars()
        # The files and names are the user's input, so whatever datasets raises on them (a schema it cannot
        # infer from an empty file, a decoding error, a bad split) is a bad value, reported in one line.
        try:
            if data.source is DataSource.text_files:
                builder = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}[
                    Path(files[0]).suffix]
                ds = datasets.load_dataset(builder, data_files=list(files), split="train")
            else:
                ds = datasets.load_dataset(data.hf_name, data.hf_config, split=data.split)
        except Exception as e:
            raise ConfigError(_unreadable(data, files, e)) from e
        if data.text_field not in ds.column_names:
            raise ConfigError(f"data.text_field={data.text_field!r} is not a column of the dataset "
                              f"(columns: {ds.column_names}); set data.text_field")
        docs = [t for t in ds[data.text_field] if t and t.strip()]
    n = math.ceil(len(docs) * data.dataset_percentage / 100)
    return docs[:n]


def _unreadable(data: DataConfig, files: Sequence[str], error: Exception) -> str:
    """The one-line error of a corpus datasets could not load, naming the key and, for local text files, the
    first that is not UTF-8 past the start validation sniffed: datasets' own error does not say which."""
    cause = error.__cause__ or error  # DatasetGenerationError wraps what went wrong
    reason = f"{type(cause).__name__}: {first_line(cause)}"
    if data.source is not DataSource.text_files:
        return (f"data.hf_name={data.hf_name!r} (data.hf_config={data.hf_config!r}, data.split={data.split!r}) "
                f"could not be loaded ({reason}); check these keys, the network or the HF cache")
    for f in (f for f in files if f.endswith(".txt")):
        try:
            with open(f, encoding="utf-8") as text:
                while text.read(1 << 20):
                    pass
        except UnicodeDecodeError as e:
            return f"data.path={data.path!r}: {f} is not UTF-8 text ({e.reason}); convert it or leave it out"
    return f"data.path={data.path!r} could not be loaded ({reason}); check its files"


class Split(StrEnum):
    train = "train"
    heldout = "heldout"  # data.val_fraction's documents: evaluated, never trained on


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: the last ceil(val_fraction * n) documents are held out, whole. A
    contiguous tail rather than a random share: neighbouring documents (paragraphs of one article, as in
    wikitext) stay on one side, so the held-out loss is not flattered by near-copies in training."""
    held = math.ceil(len(docs) * val_fraction) if val_fraction > 0 else 0
    return docs[:len(docs) - held], docs[len(docs) - held:]


def _source_fingerprint(data: DataConfig, files: Sequence[str], tokenizer_id: str, split: Split) -> str:
    keys = ("source", "seq_length", "packing", "dataset_percentage", "text_field", "synthetic_documents", "hf_name",
            "hf_config", "split", "val_fraction")
    parts: dict[str, Any] = {k: getattr(data, k) for k in keys}
    parts["version"] = CACHE_VERSION
    parts["part"] = str(split)
    if data.source is DataSource.text_files:
        parts["files"] = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
    if data.source is DataSource.synthetic:
        parts["words"] = hashlib.sha1(synthetic.WORDS_FILE.read_bytes()).hexdigest()
    tok_file = Path(os.path.expanduser(tokenizer_id), "tokenizer.json")
    parts["tokenizer"] = hashlib.sha1(tok_file.read_bytes()).hexdigest() if tok_file.exists() else tokenizer_id
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_digest(input_ids: torch.Tensor, lengths: torch.Tensor) -> str:
    """SHA-256 of the samples themselves, never of paths or mtimes: a copied or touched corpus keeps it, a
    changed corpus, tokenizer, seq_length or packing changes it."""
    h = hashlib.sha256()
    for t in (input_ids, lengths):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def tokenize(docs: list[str], tokenizer, seq_length: int, packing: bool) -> TokenizedDataset:
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if packing:
        # Documents joined by EOS and cut into seq_length blocks: no padding; only the final partial block
        # is dropped.
        stream = torch.tensor([t for ids in encoded for t in (*ids, eos)], dtype=torch.int32)
        n = len(stream) // seq_length
        ids = stream[: n * seq_length].view(n, seq_length)
        lengths = torch.full((n,), seq_length, dtype=torch.int32)
    else:
        # The tutorial's recipe: one document per sample, truncated and padded to seq_length.
        kept = [e[:seq_length] for e in encoded if len(e) >= 2]
        ids = torch.full((len(kept), seq_length), pad, dtype=torch.int32)
        for i, e in enumerate(kept):
            ids[i, : len(e)] = torch.tensor(e, dtype=torch.int32)
        lengths = torch.tensor([len(e) for e in kept], dtype=torch.int32)
    return TokenizedDataset(ids, lengths, pad, eos, content_digest(ids, lengths))


def prepare_dataset(data: DataConfig, files: Sequence[str], tokenizer_id: str, cache_dir: str,
                    split: Split = Split.train) -> TokenizedDataset:
    """Tokenized samples of one split, built once per (corpus, tokenizer, seq_length, packing, val_fraction)
    and cached on disk. The driver calls this before any worker starts (so an empty corpus fails early);
    workers then hit the cache. Each split is packed on its own: no block mixes training and held-out text."""
    paths = {s: Path(cache_dir) / f"tokens-{_source_fingerprint(data, files, tokenizer_id, s)}.pt" for s in Split}
    path = paths[split]
    if not path.exists():
        with file_lock(paths[Split.train].with_suffix(".lock")):  # one lock: both splits come from one read
            if not path.exists():
                docs = dict(zip(Split, split_documents(load_documents(data, files), data.val_fraction)))
                tokenizer = load_tokenizer(tokenizer_id)
                for s in (Split.train, Split.heldout) if data.val_fraction > 0 else (Split.train,):
                    with atomic_write(paths[s]) as tmp:
                        torch.save(vars(tokenize(docs[s], tokenizer, data.seq_length, data.packing)), tmp)
    return TokenizedDataset(**torch.load(path, weights_only=True))
