"""Model: build a Hugging Face causal LM, apply tensor parallelism, then FSDP2 — small functions over a model.

TP plans are data (module-name suffix -> ParallelStyle) per family. Embeddings, norms and lm_head stay
replicated over tp and are sharded by FSDP2 over dp only, which keeps tied embeddings working.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from tp2d_exp.config import ARCH_KEYS

# Per decoder layer, by family: q/k/v/gate/up split their output features (heads, intermediate) over tp,
# o/down split their input features and all-reduce the output. Llama and Mistral share Qwen2's names.
_DECODER_PLAN = {
    "self_attn.q_proj": ColwiseParallel,
    "self_attn.k_proj": ColwiseParallel,
    "self_attn.v_proj": ColwiseParallel,
    "self_attn.o_proj": RowwiseParallel,
    "mlp.gate_proj": ColwiseParallel,
    "mlp.up_proj": ColwiseParallel,
    "mlp.down_proj": RowwiseParallel,
}
TP_PLANS: dict[str, dict[str, type]] = {"qwen2": _DECODER_PLAN, "llama": _DECODER_PLAN, "mistral": _DECODER_PLAN}


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
    import hashlib

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


def build_model(model_cfg: dict[str, Any], seed: int) -> nn.Module:
    """The full model on CPU in fp32: pretrained weights, or a seeded random init identical on every rank
    and mesh shape (so mesh shapes start from the same parameters)."""
    from transformers import AutoModelForCausalLM

    attn = model_cfg["attn_implementation"]
    if model_cfg["pretrained"]:
        model = AutoModelForCausalLM.from_pretrained(model_cfg["name_or_path"], torch_dtype=torch.float32,
                                                     attn_implementation=attn)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config(model_cfg), torch_dtype=torch.float32,
                                                 attn_implementation=attn)
    model.config.use_cache = False
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, family: str) -> None:
    """Shard every decoder layer's projections over the tp mesh. Attention reshapes with -1 heads, so each
    rank runs its local heads (num_heads/tp, num_kv_heads/tp) without touching the HF modules."""
    if tp_mesh.size() == 1:
        return
    plan = {name: style() for name, style in TP_PLANS[family].items()}
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, plan)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """FSDP2 per decoder layer, then the root (embeddings, final norm, lm_head). FSDP2 averages gradients
    over dp; the train loop scales each rank's loss by dp so that the net effect is a sum (see train.py)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer is gathered again right away by the root's backward; keep it unsharded.
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
