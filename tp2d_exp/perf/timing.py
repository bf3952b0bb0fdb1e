"""The step-time model of run.plan_only: what one optimizer step costs a rank on a GPU, by shape.

Compute, per micro-batch and decoder layer, from the local shapes (TP shrinks the GEMMs' N or K, never M):
- GEMMs: each of q, k, v, o, gate, up, down (and lm_head, vocab-sharded under loss parallel, whole on every
  TP rank otherwise) once in forward and twice in backward (input and weight gradients, same FLOPs). A GEMM
  takes max(FLOPs / (peak x gemm_efficiency), bytes / HBM bandwidth) + a launch overhead: the roofline
  charges small or skinny GEMMs (TP's) their memory traffic, the overhead charges many small ones. One
  efficiency curve for every mesh: TP gets no factor of its own.
- attention at the real sequence length: causal kernels do half of the square, forward 2 GEMM-like passes
  (QK^T, PV), backward 5 (flash attention's backward recomputes the scores): 2 and 5 x b s^2 d FLOPs per
  head, at the GEMM efficiency.
- element-wise work (norms, rotary, SiLU, products, residual adds; the loss's casts and softmax; AdamW) is
  memory-bound: bytes read and written / HBM bandwidth. Eager runs every op as its own kernel; torch.compile
  fuses each region into one pass over its inputs and outputs (ELEMENTWISE_* below count both): that is the
  whole of compile's modelled speed-up.
- activation checkpointing re-runs forward work in backward: `full` the whole layer, `selective` the
  matmuls the policy drops (k, o, up) and every element-wise op.
Communication: TP collectives sit on the critical path (no async TP); FSDP2's all-gathers and reduce-scatters
run on their own streams and overlap the neighbouring layer's compute, so a layer exposes only what its
communication takes beyond that compute (plus the first all-gather and the last reduce-scatter, which have
nothing to hide behind).
"""

from __future__ import annotations

from dataclasses import dataclass

from tp2d_exp.config.schema import ActivationCheckpointing, GpuSpec
from tp2d_exp.config.spec import Architecture
from tp2d_exp.perf.analysis import FP32, StepShape

KERNEL_LAUNCH_S = 5e-6  # per GEMM: launch plus the tail of a kernel that cannot start the next one early


@dataclass(frozen=True)
class ComputeTimes:
    """Seconds per micro-batch on one rank."""

    layer_forward: float  # one decoder layer, forward (its TP collectives excluded)
    layer_backward: float  # one decoder layer, backward including what checkpointing recomputes
    outer: float  # embedding, final norm, lm_head forward and backward, the loss


def gemm_seconds(m: int, n: int, k: int, gpu: GpuSpec, elem: int = 2) -> float:
    flops = 2.0 * m * n * k
    traffic = elem * (m * k + k * n + m * n)
    return max(flops / (gpu.peak_bf16_tflops * 1e12 * gpu.gemm_efficiency), traffic / (gpu.hbm_tbps * 1e12)) \
        + KERNEL_LAUNCH_S


def elementwise_bytes(arch: Architecture, s: StepShape, fused: bool) -> float:
    """Bytes one layer's forward element-wise ops read and write per micro-batch (bf16 activations).
    Eager, per element of each tensor: an RMSNorm casts to fp32 (c + 4), squares (8), averages (4),
    scales (8), casts back (4 + c) and applies its weight (2c); a residual add reads two and writes one (3c);
    rotary on q and k: two products, a negation, a concatenation and a sum (11c); SiLU (2c) and the
    gate-up product (3c). Fused, each region reads its inputs and writes its outputs once: residual add +
    norm (4c: two in, two out), rotary (2c), SiLU-product (3c)."""
    c, t = s.compute_bytes, s.tp
    rows = s.tokens // t if s.sp else s.tokens  # norms and residual adds run on sequence shards under sp
    h, i = arch.hidden_size, arch.intermediate_size // t
    qk = (arch.num_attention_heads + arch.num_key_value_heads) * arch.head_dim // t
    if fused:
        return 2 * 4 * c * h * rows + 2 * c * qk * s.tokens + 3 * c * i * s.tokens
    norm = (c + FP32) + 8 + 4 + 8 + (4 + c) + 2 * c
    return 2 * (norm + 3 * c) * h * rows + 11 * c * qk * s.tokens + 5 * c * i * s.tokens


def layer_gemms(arch: Architecture, s: StepShape) -> list[tuple[str, int, int, int]]:
    """(name, M, N, K) of one layer's forward GEMMs on one rank, in HF's order."""
    h, t, m = arch.hidden_size, s.tp, s.tokens
    q, kv = arch.num_attention_heads * arch.head_dim // t, arch.num_key_value_heads * arch.head_dim // t
    i = arch.intermediate_size // t
    return [("q", m, q, h), ("k", m, kv, h), ("v", m, kv, h), ("o", m, h, q),
            ("gate", m, i, h), ("up", m, i, h), ("down", m, h, i)]


def compute_times(arch: Architecture, s: StepShape, gpu: GpuSpec) -> ComputeTimes:
    hbm = gpu.hbm_tbps * 1e12
    gemms = layer_gemms(arch, s)
    fwd_gemm = sum(gemm_seconds(m, n, k, gpu) for _, m, n, k in gemms)
    # recomputed in backward: everything (full), the matmuls the selective policy drops (the even ones)
    if s.ac is ActivationCheckpointing.full:
        re_gemm = fwd_gemm
    elif s.ac is ActivationCheckpointing.selective:
        re_gemm = sum(gemm_seconds(m, n, k, gpu) for j, (_, m, n, k) in enumerate(gemms) if j % 2 == 1)
    else:
        re_gemm = 0.0
    heads, d = arch.num_attention_heads // s.tp, arch.head_dim
    causal = s.micro_batch * heads * s.seq_length ** 2 * d  # b s^2 d per head, half the square x 2 FLOPs
    attn_rate = gpu.peak_bf16_tflops * 1e12 * gpu.gemm_efficiency
    attn_fwd, attn_bwd = 2 * causal / attn_rate, 5 * causal / attn_rate
    re_attn = attn_fwd if s.ac is ActivationCheckpointing.full else 0.0
    ew = elementwise_bytes(arch, s, fused=s.compile) / hbm
    re_ew = ew if s.ac is not ActivationCheckpointing.none else 0.0
    layer_forward = fwd_gemm + attn_fwd + ew
    layer_backward = 2 * fwd_gemm + attn_bwd + 2 * ew + re_gemm + re_attn + re_ew

    vocab = -(-arch.vocab_size // s.tp) if s.dims.loss_parallel else arch.vocab_size
    lm_head = gemm_seconds(s.tokens, vocab, arch.hidden_size, gpu)
    # the loss: cast to fp32, log-softmax (read, reduce, write), its backward and the cast back: ~40 B/logit
    loss = (8 * FP32 + 2 * s.compute_bytes) * s.tokens * vocab / hbm
    return ComputeTimes(layer_forward=layer_forward, layer_backward=layer_backward, outer=3 * lm_head + loss)


def optimizer_seconds(shard_params: int, gpu: GpuSpec) -> float:
    """AdamW (foreach) and the gradient clip over this rank's fp32 shard: memory-bound, ~92 bytes per parameter
    (moments updated in place: 12 + 20, sqrt and its scaling 24, the update 16, weight decay 8, clipping 12)."""
    return 92 * shard_params / (gpu.hbm_tbps * 1e12)
