"""Tokenizing one batch of documents into a part file: the work a store build spreads over processes (or
Ray Data actors). Imports numpy and tokenizers only, so a pool process starts in a fraction of a second."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

_tokenizer: Any = None  # a pool process's tokenizer, set once by start_worker


@dataclass
class Part:
    """A run of consecutive documents, tokenized: `<path>.tok` holds their tokens back to back (store dtype),
    `<path>.len` each document's token count (uint32)."""

    path: str
    documents: int
    tokens: int


def start_worker(tokenizer_json: str) -> None:
    """A pool process's initializer: the driver's fast tokenizer, rebuilt from its JSON (the same vocab,
    merges and normalisation, without importing transformers)."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # one tokenizer thread per process: the pool has a process per core
    global _tokenizer
    from tokenizers import Tokenizer

    _tokenizer = Tokenizer.from_str(tokenizer_json)


def encode(tok: Any, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the documents back to back, and each document's count; no special tokens (packing adds
    the EOS). `tok`: a `tokenizers.Tokenizer`, or a transformers tokenizer (its fast backend when it has one,
    which is what its __call__ runs)."""
    backend = getattr(tok, "backend_tokenizer", tok)
    if hasattr(backend, "encode_batch"):
        fast = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: faster
        ids = [e.ids for e in fast(texts, add_special_tokens=False)]
    else:  # a slow (Python) tokenizer
        ids = tok(texts, add_special_tokens=False)["input_ids"]
    lengths = np.fromiter(map(len, ids), np.uint32, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), np.dtype(dtype), count=int(lengths.sum()))
    return tokens, lengths


def tokenize_part(texts: list[str], path: str, dtype: str, tok: Any = None) -> Part:
    tokens, lengths = encode(tok or _tokenizer, texts, dtype)
    tokens.tofile(path + ".tok")
    lengths.tofile(path + ".len")
    return Part(path, len(lengths), len(tokens))


class RayTokenizer:
    """A Ray Data actor (tp2d_exp.data.build): tokenizes a batch of rows and writes it as one part into the
    store's build dir, on the filesystem the nodes share; returns only the part's name and counts."""

    def __init__(self, tokenizer_json: str, text_field: str, dtype: str, out: str):
        os.environ["RAYON_NUM_THREADS"] = "1"  # one CPU per actor: no tokenizer thread pool the size of the node
        from tokenizers import Tokenizer

        self.tok, self.field, self.dtype, self.out = Tokenizer.from_str(tokenizer_json), text_field, dtype, out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import uuid

        texts = [t for t in batch[self.field].tolist() if isinstance(t, str) and t.strip()]
        part = tokenize_part(texts, os.path.join(self.out, f"part-{uuid.uuid4().hex}"), self.dtype, self.tok)
        return {"path": np.array([part.path]), "documents": np.array([part.documents]),
                "tokens": np.array([part.tokens])}
