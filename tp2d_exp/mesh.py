"""The 2D (dp, tp) device mesh: validated once, with TP as the inner dim so TP groups are consecutive ranks."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    dp: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.dp < 1:
            raise ValueError(f"tp={self.tp} and dp={self.dp} must be positive")

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Row-major (dp, tp) over world ranks: rank = dp_rank * tp + tp_rank."""
        return init_device_mesh(device_type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
