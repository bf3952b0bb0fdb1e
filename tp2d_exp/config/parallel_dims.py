"""ParallelDims: the job's 2D mesh shape and TP options, validated once and asked everywhere.

It is the schema of the `parallelism` config group, so the driver (cluster checks, planner), the analytic
model and the workers all read the same object. Importable without torch: only `build_mesh` needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from tp2d_exp.config.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from tp2d_exp.config.spec import Architecture


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    dp: int = 1
    # TP options (no effect at tp=1). Sequence parallel: norms and the residual stream sharded along the
    # sequence between TP regions (activation memory / tp; needs data.seq_length divisible by tp).
    sequence_parallel: bool = False
    # Loss parallel: lm_head (and the embedding, which may be tied to it) sharded over the vocabulary and
    # cross-entropy computed on the logit shards, so the full logits are never gathered (torchtitan's
    # default too): lm_head's FLOPs, its parameters and the logits' memory / tp.
    loss_parallel: bool = True

    def __post_init__(self) -> None:
        for key, value in (("tp", self.tp), ("dp", self.dp)):
            if value < 1:
                raise ConfigError(f"parallelism.{key}={value} must be a positive integer; use e.g. "
                                  f"parallelism=tp2_dp2 or parallelism.{key}=2")

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    @property
    def name(self) -> str:
        """The `parallelism` preset name of this shape: tp2_dp2."""
        return f"tp{self.tp}_dp{self.dp}"

    def check_model(self, arch: Architecture, seq_length: int) -> None:
        """TP splits attention heads, KV heads and the MLP's intermediate features; sequence parallel splits
        the sequence."""
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(arch, key)
            if value % self.tp:
                raise ConfigError(f"parallelism.tp={self.tp} does not divide model.{key}={value}; "
                                  "pick a tp that divides it")
        if self.sequence_parallel and seq_length % self.tp:
            raise ConfigError(f"parallelism.sequence_parallel=true shards the sequence over tp={self.tp}, which "
                              f"does not divide data.seq_length={seq_length}; pick a seq_length divisible by tp")

    def build_mesh(self, device_type: str, grid: Sequence[Sequence[int]] | None = None) -> DeviceMesh:
        """The ("dp", "tp") mesh over `grid[dp][tp] = world rank` (every rank passes the same grid; see
        tp2d_exp.train.mesh); no grid: the row-major layout rank = dp_rank * tp + tp_rank."""
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        if grid is None:
            grid = [[d * self.tp + t for t in range(self.tp)] for d in range(self.dp)]
        mesh = torch.tensor(grid, dtype=torch.int)
        ranks = sorted(mesh.flatten().tolist())
        if tuple(mesh.shape) != (self.dp, self.tp) or ranks != list(range(self.world_size)):
            raise ValueError(f"rank grid {grid} is not a ({self.dp}, {self.tp}) layout of ranks "
                             f"0..{self.world_size - 1}")
        return DeviceMesh(device_type, mesh, mesh_dim_names=("dp", "tp"))
