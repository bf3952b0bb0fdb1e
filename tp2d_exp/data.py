"""Data: load documents, tokenize, pack (or pad), cache; then a mesh-independent global batch order that
each dp rank slices.

Invariants kept here:
- One global order per (seed, epoch) over samples; global batch k is the same set of samples for every
  mesh with the same global batch size.
- dp rank r takes the r-th contiguous share of global batch k; tp ranks of a DP group (same dp rank) get
  identical batches. Nothing here depends on the world rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from tp2d_exp import synthetic
from tp2d_exp.config import data_files
from tp2d_exp.tokenizer import file_lock

CACHE_VERSION = 2  # 2: the EOS id travels with the samples
IGNORE_INDEX = -100


@dataclass
class TokenizedDataset:
    """Samples of exactly seq_length tokens; `lengths[i]` real tokens at the start of sample i, padding
    after (packing: every length is seq_length)."""

    input_ids: torch.Tensor  # [N, seq_length] int32
    lengths: torch.Tensor  # [N] int32
    pad_id: int
    eos_id: int  # ends every document in a packed block

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = self.input_ids[indices].long()
        positions = torch.arange(ids.shape[1])
        mask = positions[None, :] < self.lengths[indices].long()[:, None]
        labels = ids.masked_fill(~mask, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


def document_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each token's position inside its document: 0 at the start of a row and after every EOS."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos_id
    return positions - torch.where(starts, positions, 0).cummax(dim=1).values


def load_documents(data: dict[str, Any]) -> list[str]:
    """The corpus as a list of non-empty documents, cut to `dataset_percentage` (first share, stable)."""
    source = data["source"]
    if source == "synthetic":
        docs = synthetic.documents(data["synthetic_documents"], seed=0)
    else:
        import datasets

        datasets.disable_progress_bars()
        if source == "text_files":
            files = data_files(data)
            builder = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}[
                Path(files[0]).suffix]
            ds = datasets.load_dataset(builder, data_files=files, split="train")
        else:
            ds = datasets.load_dataset(data["hf_name"], data["hf_config"], split=data["split"])
        if data["text_field"] not in ds.column_names:
            raise ValueError(f"data.text_field={data['text_field']!r} is not a column of the dataset "
                             f"(columns: {ds.column_names}); set data.text_field")
        docs = [t for t in ds[data["text_field"]] if t and t.strip()]
    n = math.ceil(len(docs) * data["dataset_percentage"] / 100)
    return docs[:n]


def _source_fingerprint(data: dict[str, Any], tokenizer_id: str) -> str:
    parts: dict[str, Any] = {k: data[k] for k in ("source", "seq_length", "packing", "dataset_percentage",
                                                  "text_field", "synthetic_documents", "hf_name",
                                                  "hf_config", "split")}
    parts["version"] = CACHE_VERSION
    if data["source"] == "text_files":
        parts["files"] = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in data_files(data)]
    if data["source"] == "synthetic":
        parts["words"] = hashlib.sha1(synthetic.WORDS_FILE.read_bytes()).hexdigest()
    tok_file = Path(os.path.expanduser(tokenizer_id), "tokenizer.json")
    parts["tokenizer"] = hashlib.sha1(tok_file.read_bytes()).hexdigest() if tok_file.exists() else tokenizer_id
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    return TokenizedDataset(ids, lengths, pad, eos)


def prepare_dataset(data: dict[str, Any], tokenizer_id: str, cache_dir: str) -> TokenizedDataset:
    """Tokenized samples, built once per (corpus, tokenizer, seq_length, packing) and cached on disk. The
    driver calls this before any worker starts (so an empty corpus fails early); workers then hit the cache."""
    path = Path(cache_dir) / f"tokens-{_source_fingerprint(data, tokenizer_id)}.pt"
    if not path.exists():
        with file_lock(path.with_suffix(".lock")):
            if not path.exists():
                from tp2d_exp.tokenizer import load_tokenizer

                docs = load_documents(data)
                ds = tokenize(docs, load_tokenizer(tokenizer_id), data["seq_length"], data["packing"])
                tmp = path.with_name(path.name + f".tmp{os.getpid()}")
                torch.save({"input_ids": ds.input_ids, "lengths": ds.lengths, "pad_id": ds.pad_id,
                            "eos_id": ds.eos_id}, tmp)
                os.replace(tmp, path)
    blob = torch.load(path, weights_only=True)
    return TokenizedDataset(blob["input_ids"], blob["lengths"], int(blob["pad_id"]), int(blob["eos_id"]))


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split: dp shares, each in micro-batches."""

    num_samples: int
    global_batch_size: int
    micro_batch_size: int
    dp: int
    seed: int

    def __post_init__(self) -> None:
        if self.global_batch_size % (self.micro_batch_size * self.dp):
            raise ValueError(f"global batch {self.global_batch_size} is not a multiple of "
                             f"micro batch {self.micro_batch_size} x dp {self.dp}")

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size  # the last partial global batch is dropped

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def global_batch(self, epoch: int, step_in_epoch: int) -> torch.Tensor:
        start = step_in_epoch * self.global_batch_size
        return self.order(epoch)[start: start + self.global_batch_size]

    def micro_batches(self, epoch: int, step_in_epoch: int, dp_rank: int) -> list[torch.Tensor]:
        """This dp rank's contiguous share of global batch `step_in_epoch`, split into micro-batches."""
        share = self.global_batch_size // self.dp
        mine = self.global_batch(epoch, step_in_epoch)[dp_rank * share: (dp_rank + 1) * share]
        return list(mine.split(self.micro_batch_size))

    def steps(self, start_epoch: int, start_step: int, num_epochs: int) -> Iterator[tuple[int, int]]:
        """(epoch, step_in_epoch) pairs from a position on, epoch by epoch."""
        for epoch in range(start_epoch, num_epochs):
            first = start_step if epoch == start_epoch else 0
            for step in range(first, self.steps_per_epoch):
                yield epoch, step
