"""The analytic model of one optimizer step: every collective it runs, per-rank memory, FLOPs per token.

Pure arithmetic over the model's architecture (JobSpec.resolved.arch), the mesh and the batch, so
it runs on a laptop in milliseconds and needs neither torch nor a download. It describes what this project's
code does, not a textbook: the collectives below are the ones `tp2d_exp.perf.comm.CommCounter` measures, and
tests/test_comm.py holds the two equal, count for count and byte for byte.

What one step runs (L decoder layers, A micro-batches per step, b x s tokens per micro-batch and rank,
"act" = one [b, s, hidden] activation):
- TP (tp > 1), per layer and micro-batch: forward, 2 all-reduces of the o_proj and down_proj outputs (act);
  backward, 5 all-reduces of the input gradients of q, k, v, gate and up: each ColwiseParallel module turns
  its replicated input into a DTensor of its own, so each reduces its partial input gradient on its own
  (Megatron's fused QKV / gate-up with one `f` operator would need 2).
  Sequence parallel turns each forward all-reduce into a reduce-scatter plus the next block's all-gather
  (and their backward into an all-gather each), adds the all-gather of lm_head's input and, in backward, of
  the first layer's input, and all-reduces the norm weights' gradients (replicated parameters fed by
  sequence shards) once per step. Loss parallel adds, per micro-batch, the all-reduce of the vocab-sharded
  embedding's output, lm_head's input gradient (an all-reduce, or a reduce-scatter under sequence
  parallel) and 3 all-reduces over the b x (s-1) targets inside the sharded cross-entropy (max, sum of
  exponentials, target logit; fp32).
- FSDP2 (dp > 1), per micro-batch: one all-gather per FSDP group in forward (the root group holds
  embeddings, final norm and the tied or untied lm_head; one group per decoder layer) and a re-gather in
  backward for every layer but the last (reshard_after_forward=False) and the root (never resharded
  between forward and backward); once per step, one reduce-scatter per group, in fp32.
- Bookkeeping over dp: the global token count (int64) and the loss sum (fp32) of train_step.
- Gradient norm (tp2d_exp.train.optim): per mesh that holds gradients, one all-reduce per mesh dim of size > 1 of
  the vector of per-tensor norms (one fp64 element per parameter tensor on that mesh).

Bytes are the message size per rank and call, as nccl-tests counts it: the tensor of an all-reduce, the
gathered output of an all-gather, the input of a reduce-scatter. Wire bytes (what a rank sends with ring
algorithms) are that times (n-1)/n, or 2(n-1)/n for an all-reduce; a collective over a group of one moves none.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from tp2d_exp.config.parallel_dims import ParallelDims
from tp2d_exp.config.schema import Family
from tp2d_exp.config.spec import Architecture
from tp2d_exp.records import Collective, CommTotals, Count, DimBytes, MemoryPrediction

if TYPE_CHECKING:
    from tp2d_exp.config.spec import JobSpec

FP32, FP64, INT64 = 4, 8, 8


@dataclass(frozen=True)
class Param:
    name: str  # FQN inside a decoder layer, or in the root group
    shape: tuple[int, ...]  # the full (unsharded) shape
    tp_dim: Optional[int]  # the dim TP shards (0 colwise, 1 rowwise weight); None = replicated over tp


@dataclass(frozen=True)
class StepShape:
    """What one optimizer step processes on one rank."""

    dims: ParallelDims  # mesh shape and TP options (sequence / loss parallel; no effect at tp=1)
    micro_batch: int  # samples per rank per micro-batch
    accumulation: int  # micro-batches per optimizer step
    seq_length: int
    compute_bytes: int  # parameters as all-gathered and activations: 2 (bf16 on GPU) or 4 (fp32 on CPU)
    reduce_bytes: int = FP32  # FSDP2 reduce-scatters gradients in fp32 (MixedPrecisionPolicy.reduce_dtype)

    @classmethod
    def of(cls, spec: JobSpec, compute_bytes: int) -> "StepShape":
        return cls(dims=spec.dims, micro_batch=spec.run.batch_size_per_gpu, accumulation=spec.accumulation_steps,
                   seq_length=spec.data.seq_length, compute_bytes=compute_bytes)

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def dp(self) -> int:
        return self.dims.dp


def layer_params(arch: Architecture) -> list[Param]:
    """One decoder layer's parameters with their TP placement (tp2d_exp.train.parallelize)."""
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    # Qwen2 always has q/k/v biases and no o_proj bias; Llama follows attention_bias; Mistral has none.
    llama_bias = arch.family is Family.llama and bool(arch.attention_bias)
    qkv_bias = arch.family is Family.qwen2 or llama_bias
    out = [Param("self_attn.q_proj.weight", (q, h), 0), Param("self_attn.k_proj.weight", (kv, h), 0),
           Param("self_attn.v_proj.weight", (kv, h), 0), Param("self_attn.o_proj.weight", (h, q), 1)]
    if qkv_bias:
        out += [Param("self_attn.q_proj.bias", (q,), 0), Param("self_attn.k_proj.bias", (kv,), 0),
                Param("self_attn.v_proj.bias", (kv,), 0)]
    if llama_bias:
        out.append(Param("self_attn.o_proj.bias", (h,), None))
    out += [Param("mlp.gate_proj.weight", (i, h), 0), Param("mlp.up_proj.weight", (i, h), 0),
            Param("mlp.down_proj.weight", (h, i), 1),
            Param("input_layernorm.weight", (h,), None), Param("post_attention_layernorm.weight", (h,), None)]
    return out


def root_params(arch: Architecture, loss_parallel: bool = False) -> list[Param]:
    """The root FSDP group: embeddings, final norm and, when untied, lm_head; replicated over tp, or sharded
    over the vocabulary under loss parallel."""
    h, v = arch.hidden_size, arch.vocab_size
    vocab_dim = 0 if loss_parallel else None
    out = [Param("model.embed_tokens.weight", (v, h), vocab_dim), Param("model.norm.weight", (h,), None)]
    if not arch.tie_word_embeddings:
        out.append(Param("lm_head.weight", (v, h), vocab_dim))
    return out


def on_tp_mesh(p: Param, s: StepShape) -> bool:
    """Whether TP made `p` a DTensor on the tp mesh (so, with FSDP2, on the 2D mesh), even when replicated
    over tp: the parallelized linears, the norms under sequence parallel, embedding and lm_head under loss
    parallel."""
    if s.tp == 1:
        return False
    if p.name.endswith(("proj.weight", "proj.bias")):
        return True
    if p.name.endswith("norm.weight"):
        return s.dims.sequence_parallel
    return s.dims.loss_parallel and p.name in ("model.embed_tokens.weight", "lm_head.weight")


def local_shape(p: Param, tp: int) -> tuple[int, ...]:
    if p.tp_dim is None or tp == 1:
        return p.shape
    return tuple(d // tp if k == p.tp_dim else d for k, d in enumerate(p.shape))


def shard_numel(p: Param, tp: int, dp: int) -> int:
    """Elements of the largest FSDP2 shard: dim 0 of the TP-local tensor padded to a multiple of dp, over dp."""
    shape = local_shape(p, tp)
    return math.ceil(shape[0] / dp) * math.prod(shape[1:])


def group_shard_numel(params: list[Param], tp: int, dp: int) -> int:
    return sum(shard_numel(p, tp, dp) for p in params)


def param_count(arch: Architecture) -> int:
    numel = lambda ps: sum(math.prod(p.shape) for p in ps)  # noqa: E731
    return arch.num_hidden_layers * numel(layer_params(arch)) + numel(root_params(arch))


def predict_collectives(arch: Architecture, s: StepShape) -> list[Collective]:
    """Every collective one optimizer step runs on one rank (see the module docstring)."""
    layers, a = arch.num_hidden_layers, s.accumulation
    out = [Collective("loss: global token count", "dp", "all_reduce", 1, INT64),
           Collective("loss: global loss sum", "dp", "all_reduce", 1, FP32)]
    rp = root_params(arch, s.dims.loss_parallel)
    if s.tp > 1:
        out += tp_collectives(arch, s)
    if s.dp > 1:
        root = s.dp * group_shard_numel(rp, s.tp, s.dp)
        layer = s.dp * group_shard_numel(layer_params(arch), s.tp, s.dp)
        out += [Collective("fsdp: root params all-gather (fwd)", "dp", "all_gather", a, root * s.compute_bytes),
                Collective("fsdp: layer params all-gather (fwd)", "dp", "all_gather", layers * a,
                           layer * s.compute_bytes),
                Collective("fsdp: layer params re-gather (bwd)", "dp", "all_gather", (layers - 1) * a,
                           layer * s.compute_bytes),
                Collective("fsdp: root grads reduce-scatter", "dp", "reduce_scatter", 1, root * s.reduce_bytes),
                Collective("fsdp: layer grads reduce-scatter", "dp", "reduce_scatter", layers,
                           layer * s.reduce_bytes)]
    # Gradient norm: per-tensor norms are reduced per mesh, over each of its dims of size > 1.
    layer_ps = layer_params(arch)
    on_2d = layers * sum(on_tp_mesh(p, s) for p in layer_ps) + sum(on_tp_mesh(p, s) for p in rp)
    on_dp = layers * len(layer_ps) + len(rp) - on_2d
    for dim, size in (("dp", s.dp), ("tp", s.tp)):
        if on_2d and size > 1:
            out.append(Collective(f"grad norm: 2D-mesh tensors over {dim}", dim, "all_reduce", 1, on_2d * FP64))
    if s.dp > 1:
        out.append(Collective("grad norm: dp-mesh tensors", "dp", "all_reduce", 1, on_dp * FP64))
    return [c for c in out if c.count > 0]


def tp_collectives(arch: Architecture, s: StepShape) -> list[Collective]:
    """The TP collectives of one step (tp > 1; see the module docstring)."""
    layers, a = arch.num_hidden_layers, s.accumulation
    act = s.micro_batch * s.seq_length * arch.hidden_size * s.compute_bytes
    out = [Collective("tp: q/k/v/gate/up input grads (bwd)", "tp", "all_reduce", 5 * layers * a, act)]
    if s.dims.sequence_parallel:
        out += [Collective("tp-sp: o_proj/down_proj outputs to sequence shards (fwd)", "tp", "reduce_scatter",
                           2 * layers * a, act),
                Collective("tp-sp: attention/MLP inputs from sequence shards (fwd), their grads (bwd)", "tp",
                           "all_gather", 4 * layers * a, act),
                Collective("tp-sp: lm_head input (fwd), first layer's input grad (bwd)", "tp", "all_gather",
                           2 * a, act),
                Collective("tp-sp: norm weight grads", "tp", "all_reduce", 2 * layers + 1,
                           arch.hidden_size * s.compute_bytes)]
    else:
        out.append(Collective("tp: o_proj/down_proj outputs (fwd)", "tp", "all_reduce", 2 * layers * a, act))
    if s.dims.loss_parallel:
        targets = s.micro_batch * (s.seq_length - 1) * FP32
        out += [Collective("tp-lp: vocab-sharded embedding output (fwd)", "tp", "all_reduce", a, act),
                Collective("tp-lp: lm_head input grad (bwd)", "tp",
                           "reduce_scatter" if s.dims.sequence_parallel else "all_reduce", a, act),
                Collective("tp-lp: sharded cross-entropy (max, sum exp, target logit)", "tp", "all_reduce", 3 * a,
                           targets)]
    return out


def totals(collectives: list[Collective]) -> CommTotals:
    """{dim: {kind: Count}} summed over a step: the shape CommCounter reports."""
    out: CommTotals = defaultdict(lambda: defaultdict(Count))
    for c in collectives:
        entry = out[c.dim][c.kind]
        entry.count += c.count
        entry.bytes += c.count * c.bytes
    return {d: dict(kinds) for d, kinds in out.items()}


def wire_factor(kind: str, group_size: int) -> float:
    """Bytes a rank sends per message byte with ring algorithms (nccl-tests' bus-bandwidth factor)."""
    ring = (group_size - 1) / group_size
    return 2 * ring if kind == "all_reduce" else ring


def dim_bytes(per_dim: CommTotals, dims: ParallelDims) -> dict[str, DimBytes]:
    """Message and wire bytes per mesh dim."""
    sizes = {"tp": dims.tp, "dp": dims.dp}
    return {dim: DimBytes(bytes=sum(v.bytes for v in per_dim.get(dim, {}).values()),
                          wire_bytes=sum(wire_factor(k, sizes[dim]) * v.bytes for k, v in per_dim.get(dim, {}).items()))
            for dim in ("tp", "dp")}


def flops_per_token(arch: Architecture, seq_length: int) -> float:
    """Training FLOPs per token, torchtitan's convention: 6 x matmul parameters (lm_head included, embedding
    lookup not) + 12 x layers x heads*head_dim x seq (attention scores and values, no causal discount)."""
    h, i, layers = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    matmul = layers * (2 * h * q + 2 * h * kv + 3 * h * i) + arch.vocab_size * h
    return 6 * matmul + 12 * layers * q * seq_length


def predict_memory(arch: Architecture, s: StepShape) -> MemoryPrediction:
    """Bytes per rank (the largest shard). params, grads and optimizer are exact for fp32 master weights and
    AdamW (two fp32 states plus a scalar step per tensor); gathered params and activations are estimates."""
    layers = arch.num_hidden_layers
    lp, rp = layer_params(arch), root_params(arch, s.dims.loss_parallel)
    shard = layers * group_shard_numel(lp, s.tp, s.dp) + group_shard_numel(rp, s.tp, s.dp)
    tensors = layers * len(lp) + len(rp)
    params, grads, optimizer = shard * FP32, shard * FP32, 2 * shard * FP32 + tensors * FP32
    # FSDP2 unsharded groups alive at the peak (start of backward): the root, the last layer (kept after
    # forward), the layer being re-gathered and the one prefetched; plus one layer's fp32 gradients awaiting
    # reduce-scatter. A dp=1 fp32 run computes on its shards directly.
    root_full = sum(math.prod(local_shape(p, s.tp)) for p in rp)
    layer_full = sum(math.prod(local_shape(p, s.tp)) for p in lp)
    unsharded = s.dp > 1 or s.compute_bytes != FP32
    gathered = (root_full + min(layers, 3) * layer_full) * s.compute_bytes + layer_full * FP32 if unsharded else 0
    activations = activation_bytes(arch, s)
    return MemoryPrediction(params=params, grads=grads, optimizer=optimizer, gathered_params=gathered,
                            activations=activations, total=params + grads + optimizer + gathered + activations)


def activation_bytes(arch: Architecture, s: StepShape) -> int:
    """Estimate of what one micro-batch saves for backward (no activation checkpointing), elements per token:
    per layer, 8 x hidden for the two RMSNorms (inputs, outputs, fp32 upcasts; / tp under sequence
    parallel, whole on every TP rank otherwise), 3 x (q + kv) / tp for the q/k/v outputs, rotated q/k and
    SDPA's output, 4 x intermediate / tp for gate, up, SiLU and product; then the logits in compute dtype
    plus their fp32 upcast and fp32 gradient (/ tp under loss parallel)."""
    h, i, layers = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    norms = 8 * h // (s.tp if s.dims.sequence_parallel else 1)
    per_layer = norms + (3 * (q + kv) + 4 * i) // s.tp
    vocab = arch.vocab_size // (s.tp if s.dims.loss_parallel else 1)
    tokens = s.micro_batch * s.seq_length
    return tokens * (layers * per_layer * s.compute_bytes + vocab * (s.compute_bytes + 2 * FP32))


def rough_tutorial_bytes(arch: Architecture, s: StepShape) -> dict[str, int]:
    """The tutorial's back-of-envelope figures, kept for comparison (README explains the gap): TP = layers x
    hidden x seq x batch x 2 bytes x 2 all-reduces per pass, fwd + bwd; FSDP = params x 2 bytes."""
    tp = arch.num_hidden_layers * arch.hidden_size * s.seq_length * s.micro_batch * s.accumulation * 2 * 2 * 2
    return {"tp": tp if s.tp > 1 else 0, "dp": param_count(arch) * 2 if s.dp > 1 else 0}
