"""Parallelism as small functions over a Hugging Face causal LM, applied in torchtitan's order:

    build_meta_model -> apply_tp -> apply_ac -> apply_compile -> apply_fsdp -> materialise

No rank ever holds the full model: parameters exist only as shapes (tp2d_exp.train.materialize) until FSDP2
and TP have decided each rank's shard, and then each rank writes only its shard.

TP layouts are data: module name -> ParallelStyle ("styles"; "plan" in this project means plan_only's cost
prediction). By default embeddings, norms and lm_head stay replicated over tp and are sharded by FSDP2 over
dp only. Options: sequence parallel (norms and the residual stream sharded along the sequence between TP
regions) and loss parallel (lm_head and the embedding vocab-sharded, cross-entropy on the logit shards; the
embedding goes with lm_head so that tied embeddings stay one tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from tp2d_exp.config.schema import ActivationCheckpointing, ModelConfig
from tp2d_exp.config.spec import Architecture, JobSpec
from tp2d_exp.train.materialize import build_meta_model, decoder_layers, materialise, resolve_weights_dir, tied_embeddings

COMPILE_BACKEND = "inductor"  # tests on CPU trace with "eager": same graphs, no C++ codegen


@dataclass(frozen=True)
class ParallelOptions:
    """How the model is parallelised and what it trades for speed or memory (none of it changes the math)."""

    sequence_parallel: bool = False
    loss_parallel: bool = False
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    compile: bool = False
    param_dtype: torch.dtype | None = None  # FSDP2 compute dtype (bf16 on GPU); None keeps fp32

    @classmethod
    def of(cls, spec: JobSpec, device: torch.device) -> "ParallelOptions":
        return cls(sequence_parallel=spec.dims.sequence_parallel, loss_parallel=spec.dims.loss_parallel,
                   activation_checkpointing=spec.run.activation_checkpointing, compile=spec.run.compile,
                   param_dtype=torch.bfloat16 if device.type == "cuda" else None)


# ---------------------------------------------------------------------------------------------------------
# TP styles. Every supported family (tp2d_exp.config.schema.Family) uses HF's Llama module names, so one set
# of styles serves them all.

def decoder_layer_styles(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Per decoder layer: q/k/v/gate/up split their output features (heads, intermediate) over tp, o/down
    split their input features. Without sequence parallel o/down all-reduce into a replicated residual
    stream; with it they reduce-scatter into a sequence-sharded one, the norms run on sequence shards and the
    attention/MLP inputs are all-gathered along the sequence (Megatron-SP, as in torchtitan)."""
    styles: dict[str, ParallelStyle] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    if sequence_parallel:
        styles.update({
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
    return styles


def outer_styles(sequence_parallel: bool, loss_parallel_: bool) -> dict[str, ParallelStyle]:
    """Embedding, first layer's input, final norm and lm_head (names relative to the CausalLM).

    HF builds the causal mask and rotary tables from the embedding output's sequence length, so the
    embedding output stays full-length; sequence parallel starts at the first layer's input (a local slice,
    no communication) and ends at lm_head's input (all-gather)."""
    styles: dict[str, ParallelStyle] = {}
    if sequence_parallel:
        # Local tensors between layers, as the row-parallel outputs they are added to.
        styles["model.layers.0"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                    use_local_output=True)
        styles["model.norm"] = SequenceParallel()
    lm_input = Shard(1) if sequence_parallel else Replicate()
    if loss_parallel_:
        styles["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        styles["lm_head"] = ColwiseParallel(input_layouts=lm_input, output_layouts=Shard(-1), use_local_output=False)
    elif sequence_parallel:
        styles["lm_head"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                             use_local_output=True)
    return styles


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, opts: ParallelOptions) -> None:
    """Shard every decoder layer over the tp mesh, plus the outer modules the options ask for. Attention
    reshapes with -1 heads, so each rank runs its local heads without touching the HF modules."""
    if tp_mesh.size() == 1:
        return
    tied = tied_embeddings(model)
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, decoder_layer_styles(opts.sequence_parallel))
    parallelize_module(model, tp_mesh, outer_styles(opts.sequence_parallel, opts.loss_parallel))
    if tied and not tied_embeddings(model):
        # Each parallel style registers its own new Parameter; the embedding and lm_head were given the same
        # placement (vocab rows, Shard(0)), so one of them serves both again.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


# Selective activation checkpointing: torchtitan's "op" policy (torchtitan/models/llama3/infra/parallelize.py),
# so that `selective` here means what the published torchtitan benchmarks measured. Within one layer's forward
# it keeps the outputs of the 1st, 3rd, 5th and 7th matmul (HF order: q, v, gate, down), attention (its output
# and logsumexp) and reduce-scatters, and recomputes the rest in backward (the other matmuls, norms, rotary,
# activations, residual adds, all-gathers). Two additions: HF's biased projections (Qwen2's q/k/v) run as
# addmm, counted as matmuls like mm; and TP all-reduces are kept (torchtitan always pairs TP with sequence
# parallel, whose reduce-scatters it keeps), so that recomputation never repeats a collective that sits on
# the critical path. tp2d_exp.perf.analysis.layer_saved_bytes models exactly this set.
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
_SAC_SAVE = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_reduce.default,
}


def _selective_policy(matmuls: dict[str, int], ctx, op, *args, **kwargs):
    """Keep every other matmul of the layer (the odd ones), attention and the listed collectives. Counted
    apart for the forward and the recomputation, from a fresh count per forward call (the context_fn below),
    so every step keeps the same set."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _MATMULS:
        key = "recompute" if ctx.is_recompute else "forward"
        matmuls[key] = matmuls.get(key, 0) + 1
        return CheckpointPolicy.MUST_SAVE if matmuls[key] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE if op in _SAC_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(partial(_selective_policy, {}))


def checkpoint_layer(layer: nn.Module, mode: ActivationCheckpointing) -> nn.Module:
    """One decoder layer under activation checkpointing: `full` keeps only the layer's input and recomputes the
    whole layer in backward; `selective` keeps what the policy above names."""
    if mode is ActivationCheckpointing.none:
        return layer
    # Private module, no public equivalent: the non-reentrant wrapper FSDP2 and torchtitan use per block.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs: dict[str, Any] = {"preserve_rng_state": False}  # no dropout in these models
    if mode is ActivationCheckpointing.selective:
        kwargs["context_fn"] = _selective_contexts
    return checkpoint_wrapper(layer, **kwargs)


def apply_ac(model: nn.Module, mode: ActivationCheckpointing) -> None:
    """Wrap each decoder layer in activation checkpointing (checkpoint_layer)."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_layer(layer, mode)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each decoder layer (one graph per block, reused by every layer). Applied before FSDP2
    so that FSDP's hooks stay outside the compiled region."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = torch.compile(layer, backend=COMPILE_BACKEND)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """FSDP2 per decoder layer, then the root (embeddings, final norm, lm_head). FSDP2 averages gradients
    over dp; the train loop scales each rank's loss by dp so that the net effect is a sum (tp2d_exp.train.loop)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer is gathered again right away by the root's backward; keep it unsharded.
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def build_parallel_model(model_cfg: ModelConfig, arch: Architecture, mesh: DeviceMesh, device: torch.device,
                         seed: int, opts: ParallelOptions) -> nn.Module:
    """The model with TP over mesh["tp"] and FSDP2 over mesh["dp"], each rank holding only its shards (fp32
    master weights; `opts.param_dtype` is the compute dtype)."""
    model = build_meta_model(model_cfg, arch)
    apply_tp(model, mesh["tp"], opts)
    apply_ac(model, opts.activation_checkpointing)
    if opts.compile:
        apply_compile(model)
    apply_fsdp(model, mesh["dp"], opts.param_dtype)
    weights = resolve_weights_dir(model_cfg.name_or_path) if model_cfg.pretrained else None
    materialise(model, device, seed, weights)
    return model
