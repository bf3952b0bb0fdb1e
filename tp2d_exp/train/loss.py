"""The quantity training minimises and evaluation reports: next-token cross-entropy summed over the
loss-bearing tokens of a batch (each caller divides by the token count of its whole global batch or set)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tp2d_exp.data.batch import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over loss-bearing positions. Vocab-sharded logits (loss parallel, a
    DTensor) need this and its backward inside `loss_parallel()`."""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss.full_tensor() if isinstance(loss, DTensor) else loss
