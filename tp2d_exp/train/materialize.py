"""Building the model without memory, then filling each rank's shards: the meta-device structure, a seeded
init that gives the same full tensors on every mesh without ever holding them, and lazy reads of pretrained
safetensors slices. tp2d_exp.train.parallelize decides the shards in between.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from tp2d_exp.config.schema import ModelConfig
from tp2d_exp.config.spec import Architecture
from tp2d_exp.storage import atomic_write, file_lock


def hf_config(arch: Architecture):
    """A transformers config for an architecture (no download)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(str(arch.family), **arch.hf_kwargs())
    cfg.use_cache = False
    return cfg


def model_source_dir(model_cfg: ModelConfig, arch: Architecture, tokenizer_dir: str, cache_dir: str) -> str:
    """A local dir with the HF config and tokenizer of a model built from the architecture alone, so any
    tool can rebuild the same model and tokenisation; a pretrained model's own dir or hub id otherwise."""
    if model_cfg.name_or_path:
        return model_cfg.name_or_path
    cfg = hf_config(arch)
    key = json.dumps(cfg.to_diff_dict(), sort_keys=True, default=str)
    out = Path(cache_dir) / f"{model_cfg.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if not (out / "config.json").exists():
        from tp2d_exp.data.tokenizer import load_tokenizer

        with file_lock(out.with_suffix(".lock")):
            if not (out / "config.json").exists():
                with atomic_write(out) as tmp:
                    cfg.save_pretrained(tmp)
                    load_tokenizer(tokenizer_dir).save_pretrained(tmp)
    return str(out)


def build_meta_model(model_cfg: ModelConfig, arch: Architecture) -> nn.Module:
    """The model's structure on the meta device: shapes only, no memory. A pretrained model's config comes
    from its dir or hub id, otherwise from the architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_cfg.pretrained:
        config = AutoConfig.from_pretrained(model_cfg.name_or_path)
        config.use_cache = False
    else:
        config = hf_config(arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=str(model_cfg.attn_implementation))
    model.config.use_cache = False
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def tied_embeddings(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
INIT_ROW_BLOCK = 64  # rows per random stream: the unit a rank generates, whatever its shard boundaries


def clean_fqn(name: str) -> str:
    """The parameter's name in the HF model (and its checkpoints), without AC/compile wrapper prefixes."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def local_shards(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Size, tuple[slice, ...]]]:
    """(HF name, this rank's local tensor, global shape, the global index of the local tensor) per parameter.

    The index comes from DTensor's own shard arithmetic (what DCP uses), which knows FSDP2's strided
    sharding of TP shards: tp rank t, dp rank d of a colwise weight holds rows t*R/tp + d*R/(tp*dp) onwards."""
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            local = p.to_local()
            shape, offset = _local_shape_and_offset(p)
            if tuple(shape) != tuple(local.shape):
                raise RuntimeError(f"{name}: local shard {tuple(local.shape)} but placements say {tuple(shape)}")
        else:
            local, offset = p.data, (0,) * p.ndim
        index = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
        yield clean_fqn(name), local, p.shape, index


def _local_shape_and_offset(p: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """DTensor's own shard arithmetic (what DCP uses). Private: torch has no public API for a DTensor's global
    offset, and re-deriving FSDP2's strided sharding of TP shards here would be a second source of truth."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)


def _stream_seed(seed: int, fqn: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{fqn}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_shard(dst: torch.Tensor, fqn: str, shape: torch.Size, index: tuple[slice, ...], seed: int,
               std: float) -> None:
    """Fill `dst`, the block `index` of parameter `fqn` (global `shape`), with its part of the full seeded
    init: the same full tensor on every mesh, produced without ever holding it. Matrices are N(0, std) in
    row blocks of INIT_ROW_BLOCK, each with its own generator seeded by (seed, name, block); biases are
    0 and norm weights 1 (the HF init of these families)."""
    if len(shape) == 1:
        dst.fill_(0.0 if fqn.endswith(".bias") else 1.0)
        return
    rows, cols = index[0], index[1:]
    for block in range(rows.start // INIT_ROW_BLOCK, -(-rows.stop // INIT_ROW_BLOCK)):
        b0 = block * INIT_ROW_BLOCK
        b1 = min(b0 + INIT_ROW_BLOCK, shape[0])
        gen = torch.Generator().manual_seed(_stream_seed(seed, fqn, block))
        values = torch.empty((b1 - b0, *shape[1:])).normal_(0.0, std, generator=gen)
        lo, hi = max(rows.start, b0), min(rows.stop, b1)
        dst[lo - rows.start: hi - rows.start].copy_(values[(slice(lo - b0, hi - b0), *cols)])


class SafetensorsReader:
    """Lazy reads of tensor blocks from a model's safetensors files: only the requested slice is read."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {directory}; this loader reads only safetensors")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def read(self, key: str, index: tuple[slice, ...]) -> tuple[torch.Tensor, list[int]]:
        block = self._where[key].get_slice(key)
        return block[index] if index else block[:], block.get_shape()


def resolve_weights_dir(name_or_path: str) -> str:
    """A local dir as is; a hub id via the HF cache (downloading its safetensors and config if missing)."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json"])


@torch.no_grad()
def load_shard(dst: torch.Tensor, fqn: str, shape: torch.Size, index: tuple[slice, ...], reader: SafetensorsReader,
               aliases: dict[str, str]) -> None:
    key = fqn if fqn in reader else aliases.get(fqn, fqn)
    if key not in reader:
        raise KeyError(f"weight {fqn!r} is not in the checkpoint")
    block, full_shape = reader.read(key, index)
    if list(full_shape) != list(shape):
        raise ValueError(f"weight {key!r} has shape {list(full_shape)} in the checkpoint, the model expects {list(shape)}")
    dst.copy_(block)


def materialise(model: nn.Module, device: torch.device, seed: int, weights_dir: str | None = None) -> None:
    """Allocate this rank's shards on `device` and fill them: from safetensors when `weights_dir` is given,
    else from the seeded init. Non-persistent buffers (rotary tables) are recomputed by HF's own init."""
    tied = tied_embeddings(model)
    model.to_empty(device=device)
    if tied and not tied_embeddings(model):
        raise RuntimeError("tied embeddings came apart while materialising the model")
    reader = SafetensorsReader(weights_dir) if weights_dir else None
    # A tied model's checkpoint may store the shared matrix under either name.
    aliases = {"model.embed_tokens.weight": "lm_head.weight"} if tied else {}
    std = model.config.initializer_range
    for fqn, local, shape, index in local_shards(model):
        if reader is None:
            init_shard(local, fqn, shape, index, seed, std)
        else:
            load_shard(local, fqn, shape, index, reader, aliases)
    for module in model.modules():
        if any(True for _ in module.buffers(recurse=False)):
            if any(True for _ in module.parameters(recurse=False)):
                raise NotImplementedError(f"{type(module).__name__} holds both parameters and buffers")
            _init_buffers(model, module)


@torch.no_grad()
def _init_buffers(model: nn.Module, module: nn.Module) -> None:
    """HF's own init recomputes non-persistent buffers (rotary inverse frequencies) of a module left empty by
    to_empty. Private (`_init_weights`): transformers has no public per-module init; the call is kept here alone."""
    model._init_weights(module)
