"""The mesh-independent batch order: which samples each optimizer step trains on, and each dp rank's share.

Invariants kept here:
- One global order per (seed, epoch) over samples; global batch k is the same set of samples for every
  mesh with the same global batch size.
- dp rank r takes the r-th contiguous share of global batch k, split into micro-batches; tp ranks of a DP
  group (same dp rank) get identical batches. Nothing here depends on the world rank.
"""

from __future__ import annotations

from dataclasses import dataclass
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
