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
from tp2d_exp.config.schema import ActivationCheckpointing, Family
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
    ac: ActivationCheckpointing = ActivationCheckpointing.none
    compile: bool = False
    # An attention mask (padded samples, or attention within documents) makes HF repeat the KV heads to the
    # query heads before SDPA (transformers' use_gqa_in_sdpa), so k and v are saved at the query's size.
    masked_attention: bool = False

    @classmethod
    def of(cls, spec: JobSpec, compute_bytes: int) -> "StepShape":
        d = spec.data
        return cls(dims=spec.dims, micro_batch=spec.run.batch_size_per_gpu, accumulation=spec.accumulation_steps,
                   seq_length=d.seq_length, compute_bytes=compute_bytes, ac=spec.run.activation_checkpointing,
                   compile=spec.run.compile, masked_attention=not d.packing or d.attention_within_documents)

    @property
    def sp(self) -> bool:
        return self.dims.sequence_parallel and self.tp > 1

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one rank (every rank of a TP group holds the same ones)."""
        return self.micro_batch * self.seq_length

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
    # Checkpointing re-runs a layer's forward in backward, with the collectives the recomputation cannot take
    # from the saved set, and stops once backward has what it needs (torch's early stop), before the last
    # one (down_proj's reduction feeds only the residual add): under `full` o_proj's reduction and, under
    # sequence parallel, both all-gathers; under `selective` (which keeps reduce-scatters and all-reduces)
    # the sequence-parallel all-gathers.
    if s.ac is ActivationCheckpointing.full:
        if s.dims.sequence_parallel:
            out += [Collective("tp-sp: recomputed o_proj reduce-scatter (full AC)", "tp", "reduce_scatter",
                               layers * a, act),
                    Collective("tp-sp: recomputed all-gathers (full AC)", "tp", "all_gather", 2 * layers * a, act)]
        else:
            out.append(Collective("tp: recomputed o_proj all-reduce (full AC)", "tp", "all_reduce", layers * a, act))
    elif s.ac is ActivationCheckpointing.selective and s.dims.sequence_parallel:
        out.append(Collective("tp-sp: recomputed all-gathers (selective AC)", "tp", "all_gather", 2 * layers * a, act))
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


# ---- memory: what one rank holds at its peak
#
# Bytes per rank (the largest shard), in the order a step allocates them. Model states (params, grads,
# optimizer) are exact for fp32 master weights and AdamW. Activations are what the autograd graph saves per
# decoder layer, counted op by op for HF's Qwen2/Llama layer under SDPA (layer_saved_bytes; measured on CPU
# against tp2d_exp.perf.saved in tests/test_activations.py). The peak is the largest of three moments:
#   loss      end of forward into the loss backward: every layer's saved activations, the loss's buffers
#             (train_step drops the logits before backward: fp32 log-probabilities, their gradient and the
#             logits' gradient, 12 bytes per local vocab entry and token), FSDP2's unsharded root group and
#             last layer (both kept from forward to backward);
#   layer     a layer's backward: the activations, the root's unsharded gradients (computed in the loss
#             backward, reduce-scattered at the very end), two unsharded layers (the current one and the
#             prefetched next), the layer's unsharded gradients and their fp32 copy for the reduce-scatter,
#             what checkpointing recomputes and the activation gradients in flight;
#   root reduce-scatter  the end of backward: the root group's unsharded parameters and gradients (tied:
#             the embedding's gradient added to lm_head's) and FSDP2's fp32 reduce-scatter buffers;
#   optimizer the states plus foreach AdamW's temporaries: one fp32 copy of the shard (the square root of
#             the second moment, before the update).
# GPU: the caching allocator reserves more than the tensors take (block rounding, fragmentation across the
# step's varying sizes): predicted reserved = peak x (1 + hardware.allocator_overhead), fitted on torchtitan's
# max-reserved column. CPU (a Ray worker's RSS): a process baseline (Python, torch, transformers, Ray, W&B,
# gloo) and glibc's heap, measured here (CPU_* below).

# Measured on this repository's 2-core machine through run.py (scripts/bench_plan_cpu.py; README "Mesh
# sweeps", 2026-12-05): a Ray Train worker's RSS beyond its tensors (Python, torch, transformers, Ray, gloo:
# the tiny model's peak RSS is 0.69-0.72 GiB for 0.05 GiB of tensors), and how much more RSS than live tensors
# a step's peak holds (glibc keeps freed blocks in its heap): the Qwen2.5-0.5B architecture on one rank peaks
# at the optimizer step at 11.50-11.61 GiB for 9.20 GiB of states and AdamW temporaries, 19 % over them.
CPU_PROCESS_BASELINE = int(0.64 * 2**30)
CPU_HEAP_OVERHEAD = 0.19


def layer_saved_bytes(arch: Architecture, s: StepShape, ac: Optional[ActivationCheckpointing] = None) -> int:
    """Bytes one decoder layer's forward leaves for its backward, per micro-batch and rank (local shard sizes),
    for HF's Qwen2/Llama decoder layer under SDPA: the CUDA flash / memory-efficient kernels and CPU's flash
    kernel all save q, k, v, the output and a fp32 logsumexp (never the attention matrix), and lay the output
    out as o_proj's input (one tensor). Counted per op:
    - each RMSNorm: its input upcast to fp32 (on CPU in fp32 the input itself), the normalised value in the
      compute dtype (for the weight's gradient) and the fp32 rsqrt per token; on sequence shards under
      sequence parallel;
    - the normed inputs of q/k/v and of gate/up (saved by the matmuls), full-length: under sequence parallel
      DTensor all-gathers them before the matmuls and the matmuls keep the gathered tensor;
    - attention: rotated q and k, v (k and v at the query's heads when an attention mask makes HF repeat
      them), the output, the logsumexp; rotary saves only cos/sin, shared by every layer (not counted);
    - MLP: gate's output (SiLU's input), SiLU's output, up's output and their product (down's input).
    `full` keeps only the layer's input; `selective` the input and what tp2d_exp.train.parallelize's policy
    keeps (odd matmuls: q, v, gate, down; attention; reduce-scatter and all-reduce outputs). torch.compile
    without checkpointing: AOTAutograd's partitioner keeps the norms' inputs and rsqrt and recomputes the
    fused element-wise ops (norm outputs, SiLU and product) in backward; with checkpointing the policy holds."""
    ac = s.ac if ac is None else ac
    h, i, t = arch.hidden_size, arch.intermediate_size // s.tp, s.tp
    hd = arch.head_dim
    q, kv, heads = arch.num_attention_heads * hd // t, arch.num_key_value_heads * hd // t, arch.num_attention_heads // t
    kv_saved = q if s.masked_attention else kv
    c, tokens = s.compute_bytes, s.tokens
    rows = tokens // t if s.sp else tokens  # the residual stream's tokens on this rank
    layer_input = c * h * rows
    if ac is ActivationCheckpointing.full:
        return layer_input
    attention = c * (2 * q + 2 * kv_saved) * tokens + FP32 * heads * tokens  # q, k, v, output; logsumexp
    if ac is ActivationCheckpointing.selective:
        matmuls = c * (q + kv + i) * tokens + c * h * tokens  # q, v, gate; down's (partial) output
        reductions = 0
        if t > 1:  # o_proj's and down's reduction outputs: sequence shards under sp, else the full all-reduce
            reductions = 2 * c * h * (rows if s.sp else tokens)
        return layer_input + matmuls + c * q * tokens + FP32 * heads * tokens + reductions
    rsqrt = 2 * FP32 * rows
    if s.compile:
        return 2 * c * h * rows + rsqrt + attention + 2 * c * i * tokens
    norms = 2 * (FP32 + c) * h * rows + rsqrt
    normed = 2 * c * h * tokens
    return norms + normed + attention + 4 * c * i * tokens


def loss_bytes(arch: Architecture, s: StepShape) -> int:
    """The loss's peak over one micro-batch (tp2d_exp.train.loss, logits dropped before backward), in fp32
    logit-sized tensors: natively the saved log-probabilities, their gradient and the logits' gradient (3);
    under loss parallel (tp > 1) DTensor's vocab-parallel backward holds the log-probabilities, a zeroed
    gradient, exp added to it and the product with the output gradient (4), on vocab shards."""
    parallel = s.dims.loss_parallel and s.tp > 1
    vocab = math.ceil(arch.vocab_size / s.tp) if parallel else arch.vocab_size
    return (4 if parallel else 3) * FP32 * s.tokens * vocab


def layer_backward_bytes(arch: Architecture, s: StepShape) -> int:
    """What a layer's backward holds briefly beyond the saved activations: what checkpointing recomputes
    (the layer's whole set less what was kept) and the activation gradients in flight, estimated as three
    MLP-sized and two hidden-sized tensors (SiLU's backward holds the gradients of gate, up and the product)."""
    recomputed = layer_saved_bytes(arch, s, ActivationCheckpointing.none) - layer_saved_bytes(arch, s)
    c, tokens = s.compute_bytes, s.tokens
    return recomputed + 3 * c * arch.intermediate_size // s.tp * tokens + 2 * c * arch.hidden_size * tokens


def predict_memory(arch: Architecture, s: StepShape, allocator_overhead: float = 0.0) -> MemoryPrediction:
    """The peak bytes per rank (see above). `allocator_overhead`: the GPU caching allocator's reserved/allocated
    - 1 at the peak; CPU ranks (fp32 compute) use the measured process baseline and heap overhead instead."""
    layers = arch.num_hidden_layers
    lp, rp = layer_params(arch), root_params(arch, s.dims.loss_parallel)
    shard = layers * group_shard_numel(lp, s.tp, s.dp) + group_shard_numel(rp, s.tp, s.dp)
    tensors = layers * len(lp) + len(rp)
    params, grads, optimizer = shard * FP32, shard * FP32, 2 * shard * FP32 + tensors * FP32
    c = s.compute_bytes
    root_full = sum(math.prod(local_shape(p, s.tp)) for p in rp)
    layer_full = sum(math.prod(local_shape(p, s.tp)) for p in lp)
    # FSDP2 computes on unsharded copies when it gathers (dp > 1) or casts (bf16), and then produces unsharded
    # gradients (cast to fp32 for the reduce-scatter when computed in bf16); a dp=1 fp32 run computes on its
    # shards directly.
    unsharded = s.dp > 1 or c != FP32
    full = (lambda n: n * c) if unsharded else (lambda n: 0)  # noqa: E731
    reduce_copy = layer_full * FP32 if unsharded and c != FP32 else 0
    activations, loss = layers * layer_saved_bytes(arch, s), loss_bytes(arch, s)
    # The root group's gradients at the end of backward: lm_head's (from the loss backward) and, tied, the
    # embedding's added to it (a second one while it accumulates); FSDP2 then copies them into an fp32
    # reduce-scatter input and receives the output shard.
    embedding = math.prod(local_shape(rp[0], s.tp))
    root_grads = full(root_full + (embedding if arch.tie_word_embeddings else 0))
    root_reduce = root_full * FP32 * (1 + 1 / s.dp) if unsharded else 0
    # (activations, loss, gathered params, other transients) at each candidate peak
    phases = {"loss": (activations, loss, full(root_full + layer_full), 0),
              "layer backward": (activations, 0, full(root_full + 2 * layer_full),
                                 full(root_full + layer_full) + reduce_copy + layer_backward_bytes(arch, s)),
              "root reduce-scatter": (0, 0, full(root_full), root_grads + round(root_reduce)),
              "optimizer": (0, 0, 0, shard * FP32)}
    phase = max(phases, key=lambda k: sum(phases[k]))
    acts, loss_at_peak, gathered, transient = phases[phase]
    # Model states count whole at every phase: zero_grad frees the gradients between steps, but the allocator
    # keeps their blocks (GPU) and glibc its heap (CPU) for the next backward.
    allocated = params + grads + optimizer + sum(phases[phase])
    if c == FP32:  # CPU ranks
        total = CPU_PROCESS_BASELINE + round(allocated * (1 + CPU_HEAP_OVERHEAD))
    else:
        total = round(allocated * (1 + allocator_overhead))
    return MemoryPrediction(params=params, grads=grads, optimizer=optimizer, gathered_params=gathered,
                            activations=acts, loss=loss_at_peak, transient=transient, peak_phase=phase,
                            allocated=allocated, total=total)


def rough_tutorial_bytes(arch: Architecture, s: StepShape) -> dict[str, int]:
    """The tutorial's back-of-envelope figures, kept for comparison (README explains the gap): TP = layers x
    hidden x seq x batch x 2 bytes x 2 all-reduces per pass, fwd + bwd; FSDP = params x 2 bytes."""
    tp = arch.num_hidden_layers * arch.hidden_size * s.seq_length * s.micro_batch * s.accumulation * 2 * 2 * 2
    return {"tp": tp if s.tp > 1 else 0, "dp": param_count(arch) * 2 if s.dp > 1 else 0}
