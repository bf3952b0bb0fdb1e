"""Held-out loss on the training mesh: the same number on every mesh, and no trace left on training.

- The evaluated set does not depend on the mesh: the first `run.eval_samples` samples of the held-out store,
  in store order. They are cut into global eval batches of batch_size_per_gpu x dp samples, and dp rank r takes
  the r-th contiguous micro-batch of each, as in training (tp ranks of a DP group see the same samples). The
  last batch is padded with fully masked rows, never dropped, so every rank runs the same forward passes (the
  FSDP all-gathers and TP collectives inside them must match across ranks).
- The loss is the token mean over the whole set: each rank's sums of token losses and of tokens, in fp64,
  all-reduced over dp. A micro-batch holds the same samples on every mesh with the same micro-batch size, so
  meshes differ only in the order of fp32 operations inside one forward.
- Observing never steers: model.eval() under no_grad (no dropout, so no RNG drawn; no gradients, so nothing
  reaches the optimizer), and the data position of training is not touched.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from tp2d_exp.data.batch import IGNORE_INDEX, Batch, document_positions
from tp2d_exp.data.dataset import Samples
from tp2d_exp.train.loss import token_loss_sum

PADDING = -1  # an index that fills the last eval batch: a row with every label masked


@dataclass(frozen=True)
class EvalResult:
    loss: float  # token mean over the evaluated held-out samples, the same on every rank and mesh
    tokens: int  # loss-bearing tokens scored
    samples: int

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def eval_indices(num_samples: int, micro_batch: int, dp: int, dp_rank: int) -> list[torch.Tensor]:
    """This dp rank's micro-batches of the first `num_samples` held-out samples: its contiguous share of
    each global eval batch, padded with PADDING to full size."""
    batch = micro_batch * dp
    padded = torch.full((-(-num_samples // batch) * batch,), PADDING, dtype=torch.long)
    padded[:num_samples] = torch.arange(num_samples)
    return [b[dp_rank * micro_batch:(dp_rank + 1) * micro_batch] for b in padded.split(batch)]


def heldout_batch(heldout: Samples, indices: torch.Tensor) -> Batch:
    """The samples at `indices`; PADDING rows repeat sample 0 with every label masked (they cost a forward
    row and score nothing)."""
    b = heldout.batch(indices.clamp(min=0))
    b.labels[indices == PADDING] = IGNORE_INDEX
    return b


@torch.no_grad()
def evaluate(model: torch.nn.Module, heldout: Samples, num_samples: int, micro_batch: int,
             dp_mesh, device: torch.device, packing: bool, within_documents: bool) -> EvalResult:
    """Token-mean loss of the model on the first `num_samples` held-out samples, on the training mesh
    (`dp_mesh`: the mesh's dp dimension)."""
    dp, dp_rank = dp_mesh.size(), dp_mesh.get_local_rank()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # token-loss sum, token count
    was_training = model.training
    model.eval()
    try:
        for idx in eval_indices(num_samples, micro_batch, dp, dp_rank):
            b = heldout_batch(heldout, idx)
            mask = None if packing else b.attention_mask.to(device)
            positions = document_positions(b.input_ids, heldout.eos_id).to(device) if within_documents else None
            logits = model(input_ids=b.input_ids.to(device), attention_mask=mask, position_ids=positions).logits
            with loss_parallel() if isinstance(logits, DTensor) else nullcontext():
                sums[0] += token_loss_sum(logits, b.labels.to(device)).double()
            sums[1] += (b.labels[:, 1:] != IGNORE_INDEX).sum().item()
    finally:
        model.train(was_training)
    dist.all_reduce(sums, group=dp_mesh.get_group())
    tokens = int(sums[1].item())
    return EvalResult(loss=float(sums[0] / max(tokens, 1)), tokens=tokens, samples=num_samples)
