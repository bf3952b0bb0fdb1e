"""The mesh-independent batch order: which samples each optimizer step trains on, and each dp rank's share.

Invariants kept here:
- One global order per (seed, epoch) over samples; global batch k is the same set of samples for every
  mesh with the same global batch size.
- dp rank r takes the r-th contiguous share of global batch k, split into micro-batches; tp ranks of a DP
  group (same dp rank) get identical batches. Nothing here depends on the world rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from tp2d_exp.config.spec import JobSpec


@dataclass(frozen=True)
class BatchOrder:
    num_samples: int
    global_batch_size: int  # a multiple of micro_batch_size * dp (tp2d_exp.config.validate)
    micro_batch_size: int
    dp: int
    seed: int

    @classmethod
    def of(cls, spec: JobSpec) -> "BatchOrder":
        """The order of a prepared job (its corpus size is known)."""
        return cls(num_samples=spec.resolved.num_samples, global_batch_size=spec.resolved.global_batch_size,
                   micro_batch_size=spec.run.batch_size_per_gpu, dp=spec.dims.dp, seed=spec.run.seed)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size  # the last partial global batch is dropped

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of the samples, computed once per epoch and kept (4 bytes per sample, 8
        past 2**31 samples): a step then costs O(global batch), not O(corpus)."""
        return _permutation(self.num_samples, self.seed * 1_000_003 + epoch)

    def global_batch(self, epoch: int, start: int) -> torch.Tensor:
        """The global batch that starts at sample `start` of the epoch's order."""
        return self.order(epoch)[start: start + self.global_batch_size]

    def micro_batches(self, epoch: int, start: int, dp_rank: int) -> list[torch.Tensor]:
        """This dp rank's contiguous share of the global batch at `start`, split into micro-batches."""
        share = self.global_batch_size // self.dp
        mine = self.global_batch(epoch, start)[dp_rank * share: (dp_rank + 1) * share]
        return list(mine.split(self.micro_batch_size))

    def has_batch(self, start: int) -> bool:
        """Whether a whole global batch starts at sample `start` of an epoch (a partial last one is dropped)."""
        return start + self.global_batch_size <= self.num_samples

    def steps(self, epoch: int, start: int, num_epochs: int) -> Iterator[tuple[int, int]]:
        """(epoch, first sample) of every global batch from a position on, epoch by epoch. A position saved
        under another global batch size need not be a multiple of this one: the next batch starts there."""
        for e in range(epoch, num_epochs):
            for s in range(start if e == epoch else 0, self.num_samples - self.global_batch_size + 1,
                           self.global_batch_size):
                yield e, s

    def end_samples(self, samples: int, epoch: int, start: int, num_epochs: int) -> int:
        """Samples consumed once `steps(epoch, start, num_epochs)` is exhausted, `samples` consumed so far."""
        if epoch >= num_epochs:
            return samples
        this_epoch = max(0, (self.num_samples - start) // self.global_batch_size) * self.global_batch_size
        return samples + this_epoch + (num_epochs - epoch - 1) * self.steps_per_epoch * self.global_batch_size


@lru_cache(maxsize=2)  # this epoch's and, across an epoch boundary, the last one's
def _permutation(n: int, seed: int) -> torch.Tensor:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm.to(torch.int32) if n < 2**31 else perm
