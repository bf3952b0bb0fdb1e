"""A weighted mixture of token stores, seen as one sample space that the batch order shuffles like any store.

An epoch of the mixture has `length` positions (the sum of the stores' samples unless `data.mixture_samples`
sets it). Source s owns a contiguous range of quota_s = its weight's share of the positions (largest
remainders, so the quotas sum to the length exactly); in epoch e, position p of that range is sample
(e * quota_s + p) mod N_s of store s: a source smaller than its quota wraps around (each wrap is a pass,
counted in the summary), and one larger than its quota goes on where the last epoch stopped, so every
sample is read before any is read again. The global batch order permutes positions (tp2d_exp.data.order), so every global batch
draws each source in proportion to its weight, the same way on every mesh, and mapping a position to its
sample is O(1) with no per-sample table.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from tp2d_exp.data.batch import Batch
from tp2d_exp.data.store import TokenStore


def quotas(weights: Sequence[float], length: int) -> list[int]:
    """Integers proportional to the weights that sum to `length` (largest remainder method)."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * length
    q = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - q), kind="stable")[:length - int(q.sum())]:
        q[i] += 1
    return q.tolist()


class Mixture:
    def __init__(self, stores: Sequence[TokenStore], weights: Sequence[float], names: Sequence[str], length: int = 0,
                 spread: bool = False):
        """`spread`: positions go through a fixed permutation first, so that any prefix (what evaluation reads)
        is a weighted mix too; training does not need it (its order is shuffled anyway)."""
        self.stores, self.weights, self.names = list(stores), list(weights), list(names)
        self.length = length or sum(len(s) for s in self.stores)
        self.quotas = quotas(self.weights, self.length)
        self.starts = np.concatenate([[0], np.cumsum(self.quotas)])
        self.spread = torch.randperm(self.length, generator=torch.Generator().manual_seed(0)).numpy() \
            if spread else None
        first = self.stores[0]
        self.pad_id, self.eos_id = first.pad_id, first.eos_id
        parts = [f"{s.digest}:{q}" for s, q in zip(self.stores, self.quotas)]
        self.digest = hashlib.sha256(f"mixture/{'spread' if spread else ''}/{'/'.join(parts)}".encode()
                                     ).hexdigest()[:32]

    def __len__(self) -> int:
        return self.length

    def locate(self, positions: np.ndarray, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample of that source) of each position of an epoch."""
        pos = np.asarray(positions, np.int64)
        if self.spread is not None:
            pos = self.spread[pos]
        src = np.searchsorted(self.starts, pos, side="right") - 1
        sizes = np.array([len(s) for s in self.stores], np.int64)
        quotas = np.asarray(self.quotas, np.int64)
        return src, (epoch * quotas[src] + pos - self.starts[src]) % sizes[src]

    def batch(self, indices: torch.Tensor, epoch: int = 0) -> Batch:
        src, idx = self.locate(np.asarray(indices), epoch)
        seq = self.stores[0].meta.seq_length
        ids, lengths = np.empty((len(idx), seq), np.int64), np.empty(len(idx), np.int64)
        for s in np.unique(src):
            at = src == s
            ids[at], lengths[at] = self.stores[s].rows(idx[at])
        return Batch.of(ids, lengths)

    def passes(self, epochs: int, positions: np.ndarray) -> dict[str, float]:
        """How many times each source has been read through after `epochs` whole epochs and then the
        positions `positions` of the next one."""
        src, _ = self.locate(positions)
        draws = np.asarray(self.quotas) * epochs + np.bincount(src, minlength=len(self.stores))
        return {n: round(float(d) / len(s), 4) for n, s, d in zip(self.names, self.stores, draws)}
