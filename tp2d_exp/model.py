"""Model: a Hugging Face causal LM built on the meta device, parallelised, then materialised shard by shard.

torchtitan's order, as small functions over a model:
    build_meta_model -> apply_tp -> apply_ac -> apply_compile -> apply_fsdp -> materialise
No rank ever holds the full model: parameters exist only as shapes until FSDP2 and TP have decided each
rank's shard, and then each rank writes only its shard, either from a seeded init that gives the same full
tensor whatever the mesh (so every mesh starts from the same parameters) or read lazily from safetensors.

TP plans are data (module-name -> ParallelStyle). By default embeddings, norms and lm_head stay replicated
over tp and are sharded by FSDP2 over dp only. Options: sequence parallel (norms and the residual stream
sharded along the sequence between TP regions) and loss parallel (lm_head and the embedding vocab-sharded,
cross-entropy on the logit shards; the embedding goes with lm_head so that tied embeddings stay one tensor).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from tp2d_exp.config import ARCH_KEYS

AC_MODES = ("none", "selective", "full")
COMPILE_BACKEND = "inductor"  # tests on CPU trace with "aot_eager": same graphs, no C++ codegen


@dataclass(frozen=True)
class ParallelOptions:
    """How the model is parallelised and what it trades for speed or memory (none of it changes the math)."""

    sequence_parallel: bool = False
    loss_parallel: bool = False
    activation_checkpointing: str = "none"  # none | selective | full
    compile: bool = False
    param_dtype: torch.dtype | None = None  # FSDP2 compute dtype (bf16 on GPU); None keeps fp32

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device) -> "ParallelOptions":
        par, run = cfg["parallelism"], cfg["run"]
        return cls(sequence_parallel=par["sequence_parallel"], loss_parallel=par["loss_parallel"],
                   activation_checkpointing=run["activation_checkpointing"], compile=run["compile"],
                   param_dtype=torch.bfloat16 if device.type == "cuda" else None)


# ---------------------------------------------------------------------------------------------------------
# TP plans. Qwen2, Llama and Mistral share module names, so one plan serves the three families.

def decoder_layer_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Per decoder layer: q/k/v/gate/up split their output features (heads, intermediate) over tp, o/down
    split their input features. Without sequence parallel o/down all-reduce into a replicated residual
    stream; with it they reduce-scatter into a sequence-sharded one, the norms run on sequence shards and the
    attention/MLP inputs are all-gathered along the sequence (Megatron-SP, as in torchtitan)."""
    plan: dict[str, ParallelStyle] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    if sequence_parallel:
        plan.update({
            "input_layernorm": SequenceParallel(),
            # HF passes the attention input as a keyword, the MLP input positionally.
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()},
                                            use_local_output=True),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                      use_local_output=True),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    return plan


def outer_plan(sequence_parallel: bool, loss_parallel_: bool) -> dict[str, ParallelStyle]:
    """Embedding, first layer's input, final norm and lm_head (names relative to the CausalLM).

    HF builds the causal mask and rotary tables from the embedding output's sequence length, so the
    embedding output stays full-length; sequence parallel starts at the first layer's input (a local slice,
    no communication) and ends at lm_head's input (all-gather)."""
    plan: dict[str, ParallelStyle] = {}
    if sequence_parallel:
        # Local tensors between layers, as the row-parallel outputs they are added to.
        plan["model.layers.0"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                    use_local_output=True)
        plan["model.norm"] = SequenceParallel()
    lm_input = Shard(1) if sequence_parallel else Replicate()
    if loss_parallel_:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        plan["lm_head"] = ColwiseParallel(input_layouts=lm_input, output_layouts=Shard(-1), use_local_output=False)
    elif sequence_parallel:
        plan["lm_head"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                             use_local_output=True)
    return plan


TP_PLANS: dict[str, Callable[[bool], dict[str, ParallelStyle]]] = {
    "qwen2": decoder_layer_plan, "llama": decoder_layer_plan, "mistral": decoder_layer_plan}


# ---------------------------------------------------------------------------------------------------------
# Build.

def hf_config(model_cfg: dict[str, Any]):
    """A transformers config for the architecture in `model_cfg` (no download)."""
    from transformers import AutoConfig

    kwargs = {k: model_cfg[k] for k in ARCH_KEYS}
    if model_cfg.get("attention_bias") is not None:
        kwargs["attention_bias"] = model_cfg["attention_bias"]
    cfg = AutoConfig.for_model(model_cfg["family"], **kwargs)
    cfg.use_cache = False
    return cfg


def model_source_dir(model_cfg: dict[str, Any], tokenizer_dir: str, cache_dir: str) -> str:
    """A local dir with the HF config and tokenizer of a model built from the architecture alone, so any
    tool can rebuild the same model and tokenisation; a pretrained model's own dir or hub id otherwise."""
    if model_cfg["name_or_path"]:
        return model_cfg["name_or_path"]
    cfg = hf_config(model_cfg)
    key = json.dumps(cfg.to_diff_dict(), sort_keys=True, default=str)
    out = Path(cache_dir) / f"{model_cfg['name']}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if not (out / "config.json").exists():
        from tp2d_exp.tokenizer import file_lock, load_tokenizer

        with file_lock(out.with_suffix(".lock")):
            if not (out / "config.json").exists():
                tmp = out.with_name(out.name + f".tmp{os.getpid()}")
                cfg.save_pretrained(tmp)
                load_tokenizer(tokenizer_dir).save_pretrained(tmp)
                os.replace(tmp, out)
    return str(out)


def build_meta_model(model_cfg: dict[str, Any]) -> nn.Module:
    """The model's structure on the meta device: shapes only, no memory. A pretrained model's config comes
    from its dir or hub id, otherwise from the architecture keys."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_cfg["pretrained"]:
        config = AutoConfig.from_pretrained(model_cfg["name_or_path"])
        config.use_cache = False
    else:
        config = hf_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=model_cfg["attn_implementation"])
    model.config.use_cache = False
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def tied_embeddings(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, family: str, opts: ParallelOptions) -> None:
    """Shard every decoder layer over the tp mesh, plus the outer modules the options ask for. Attention
    reshapes with -1 heads, so each rank runs its local heads without touching the HF modules."""
    if tp_mesh.size() == 1:
        return
    tied = tied_embeddings(model)
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, TP_PLANS[family](opts.sequence_parallel))
    parallelize_module(model, tp_mesh, outer_plan(opts.sequence_parallel, opts.loss_parallel))
    if tied and not tied_embeddings(model):
        # Each parallel style registers its own new Parameter; the embedding and lm_head were given the same
        # placement (vocab rows, Shard(0)), so one of them serves both again.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def _selective_policy(ctx, op, *args, **kwargs):
    """Selective activation checkpointing (Korthikanti et al.): keep the outputs of matmuls, attention and
    collectives, recompute the cheap element-wise work (norms, activations, rotary, residual adds)."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAC_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


_SAC_SAVE = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.all_reduce.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
}


def apply_ac(model: nn.Module, mode: str) -> None:
    """Wrap each decoder layer in activation checkpointing: `full` keeps only the layer's input and
    recomputes the whole layer in backward; `selective` keeps matmul/attention/collective outputs."""
    if mode == "none":
        return
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}; use one of {AC_MODES}")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs: dict[str, Any] = {"preserve_rng_state": False}  # no dropout in these models
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, **kwargs)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each decoder layer (one graph per block, reused by every layer). Applied before FSDP2
    so that FSDP's hooks stay outside the compiled region."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = torch.compile(layer, backend=COMPILE_BACKEND)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """FSDP2 per decoder layer, then the root (embeddings, final norm, lm_head). FSDP2 averages gradients
    over dp; the train loop scales each rank's loss by dp so that the net effect is a sum (see train.py)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer is gathered again right away by the root's backward; keep it unsharded.
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


# ---------------------------------------------------------------------------------------------------------
# Materialise: allocate local shards, then fill them from a seeded init or from safetensors.

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
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            local = p.to_local()
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            if tuple(shape) != tuple(local.shape):
                raise RuntimeError(f"{name}: local shard {tuple(local.shape)} but placements say {tuple(shape)}")
        else:
            local, offset = p.data, (0,) * p.ndim
        index = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
        yield clean_fqn(name), local, p.shape, index


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
            with torch.no_grad():
                model._init_weights(module)


def build_parallel_model(model_cfg: dict[str, Any], mesh: DeviceMesh, device: torch.device, seed: int,
                         opts: ParallelOptions) -> nn.Module:
    """The model with TP over mesh["tp"] and FSDP2 over mesh["dp"], each rank holding only its shards (fp32
    master weights; `opts.param_dtype` is the compute dtype)."""
    model = build_meta_model(model_cfg)
    apply_tp(model, mesh["tp"], model_cfg["family"], opts)
    apply_ac(model, opts.activation_checkpointing)
    if opts.compile:
        apply_compile(model)
    apply_fsdp(model, mesh["dp"], opts.param_dtype)
    weights = resolve_weights_dir(model_cfg["name_or_path"]) if model_cfg["pretrained"] else None
    materialise(model, device, seed, weights)
    return model
