"""What the step loop gets: a micro-batch of samples as model inputs, and the per-document positions of
packed samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, seq_length]
    attention_mask: torch.Tensor  # 1 on real tokens, 0 on padding
    labels: torch.Tensor  # input_ids with padding set to IGNORE_INDEX (the shift happens in the loss)

    @classmethod
    def of(cls, ids: np.ndarray, lengths: np.ndarray) -> "Batch":
        """Samples whose first lengths[i] tokens are real and the rest padding."""
        input_ids = torch.from_numpy(np.ascontiguousarray(ids, np.int64))
        mask = torch.arange(input_ids.shape[1])[None, :] < torch.from_numpy(np.asarray(lengths, np.int64))[:, None]
        return cls(input_ids=input_ids, attention_mask=mask.long(), labels=input_ids.masked_fill(~mask, IGNORE_INDEX))


def document_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each token's position inside its document: 0 at the start of a row and after every EOS."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos_id
    return positions - torch.where(starts, positions, 0).cummax(dim=1).values
