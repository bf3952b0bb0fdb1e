"""Optimizer, its LR and gradient clipping for parameters spread over several meshes."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from tp2d_exp.config.schema import RunConfig


class _NormReductionHint(logging.Filter):
    """DTensor suggests flattening (dp, tp) when the norm of a 2D-sharded gradient is reduced over both dims
    in turn. Those are two all-reduces of a few hundred bytes per step (one fp64 per tensor, counted in
    tp2d_exp.perf.analysis), not worth a flattened mesh; the hint would otherwise repeat in every rank's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_NormPartial" not in record.getMessage()


logging.getLogger("torch.distributed.tensor._redistribute").addFilter(_NormReductionHint())


def build_optimizer(model: nn.Module, run: RunConfig) -> torch.optim.Optimizer:
    """AdamW over the fp32 master parameters (FSDP2 keeps them fp32; bf16 is compute only), foreach.
    No weight decay on biases and norm weights, as usual for LLMs."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=run.learning_rate, betas=(run.adam_beta1, run.adam_beta2), foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR for the next step (tp2d_exp.config.schedule: a function of samples consumed, so it
    survives a change of global batch size and needs no scheduler state in checkpoints)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Total L2 norm of all gradients, clipped to `max_norm` when > 0.

    torch's clip_grad_norm_ fails when parameters live on different meshes ((dp, tp) for TP layers,
    dp only for embeddings and norms), so the norm is reduced per mesh and the partial squares summed.
    Norms are taken in fp64: an fp32 norm of the 2M-element embedding gradient is off by ~1e-4 relative,
    by a different amount for each shard size, which made the norm (and the clip coefficient) mesh-dependent.
    """
    by_mesh: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            by_mesh[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p.grad)
    total_sq = 0.0  # a Python float: fp64
    for grads in by_mesh.values():
        # Per-tensor norms stay partial over the mesh until the stacked norm is reduced: one all-reduce per mesh dim.
        norms = torch.stack([torch.linalg.vector_norm(g, 2, dtype=torch.float64) for g in grads])
        norm = torch.linalg.vector_norm(norms, 2)
        total_sq += float(norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
    total = math.sqrt(total_sq)
    if max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for grads in by_mesh.values():
            _scale(grads, coef)
    return total


def _scale(grads: list[torch.Tensor], coef: float) -> None:
    """One fused multiply per mesh group. torch's public clip_grads_with_norm_ scales by a device tensor,
    which DTensors of several meshes refuse to mix with, so this calls the foreach kernel it wraps."""
    torch._foreach_mul_(grads, coef)
