"""Where the ranks landed and how the 2D (dp, tp) mesh groups them (ParallelDims.build_mesh builds it).

TP all-reduces run on every layer of every step and need the fastest links (NVLink inside a node), so each
TP group is a set of ranks on one node whenever the node counts allow; FSDP's dp collectives may cross
nodes. The layout is a rank grid `grid[dp][tp] = world rank`, built from the node of every rank (gathered
at start-up, not assumed from rank order); when ranks are node-contiguous it is the plain row-major order
rank = dp * tp + tp_rank. Only the dp coordinate decides a rank's data slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch.distributed as dist

from tp2d_exp.config.parallel_dims import ParallelDims
from tp2d_exp.records import PlacementReport


def rank_grid(node_of_rank: Sequence[str], tp: int) -> list[list[int]]:
    """TP groups of `tp` ranks, each inside one node as far as the node counts allow, as rows of the grid.

    Every node contributes floor(its ranks / tp) whole groups (its ranks ascending); the ranks left over
    (a node holding a count that tp does not divide) fill the remaining groups in rank order, spanning
    nodes. Rows are ordered by their lowest rank, so node-contiguous ranks give the row-major grid.
    """
    if len(node_of_rank) % tp:
        raise ValueError(f"{len(node_of_rank)} ranks do not split into TP groups of {tp}")
    by_node: dict[str, list[int]] = {}
    for rank, node in enumerate(node_of_rank):
        by_node.setdefault(node, []).append(rank)
    groups, leftover = [], []
    for ranks in by_node.values():
        whole = len(ranks) - len(ranks) % tp
        groups += [ranks[i:i + tp] for i in range(0, whole, tp)]
        leftover += ranks[whole:]
    groups += [sorted(leftover)[i:i + tp] for i in range(0, len(leftover), tp)]
    return sorted(groups)


@dataclass(frozen=True)
class Placement:
    """Where every rank runs and how the mesh groups them."""

    node_of_rank: tuple[str, ...]
    grid: tuple[tuple[int, ...], ...]  # grid[dp][tp] = world rank

    @classmethod
    def from_nodes(cls, node_of_rank: Sequence[str], tp: int) -> "Placement":
        return cls(tuple(node_of_rank), tuple(tuple(row) for row in rank_grid(node_of_rank, tp)))

    def coordinate(self, rank: int) -> tuple[int, int]:
        """(dp, tp) coordinate of a world rank."""
        for dp, row in enumerate(self.grid):
            if rank in row:
                return dp, row.index(rank)
        raise ValueError(f"rank {rank} is not in the grid")

    def nodes_of_group(self, dp: int) -> list[str]:
        return sorted({self.node_of_rank[r] for r in self.grid[dp]})

    @property
    def nodes(self) -> list[str]:
        return list(dict.fromkeys(self.node_of_rank))

    @property
    def tp_intra_node(self) -> bool:
        return all(len(self.nodes_of_group(dp)) == 1 for dp in range(len(self.grid)))

    @classmethod
    def from_report(cls, report: PlacementReport) -> "Placement":
        return cls(tuple(report.node_of_rank), tuple(map(tuple, report.tp_groups)))

    def describe(self) -> PlacementReport:
        """For summary.json and W&B: node of every rank, TP groups (rows of the grid) and how many whole TP
        groups each node holds."""
        per_node = {node: 0 for node in self.nodes}
        for dp in range(len(self.grid)):
            group_nodes = self.nodes_of_group(dp)
            if len(group_nodes) == 1:
                per_node[group_nodes[0]] += 1
        return PlacementReport(num_nodes=len(self.nodes), node_of_rank=list(self.node_of_rank),
                               tp_groups=[list(row) for row in self.grid], tp_groups_per_node=per_node,
                               tp_intra_node=self.tp_intra_node)

    def warning(self) -> str | None:
        """One line when some TP group spans nodes, else None."""
        if self.tp_intra_node:
            return None
        counts = [self.node_of_rank.count(node) for node in self.nodes]
        split = [list(row) for dp, row in enumerate(self.grid) if len(self.nodes_of_group(dp)) > 1]
        tp = len(self.grid[0])
        return (f"TP groups {split} span nodes (tp={tp}, ranks per node {counts}): their per-layer all-reduces "
                f"cross the inter-node network; use a tp that divides the devices per node")


def gather_placement(dims: ParallelDims, node_id: str) -> Placement:
    """Every rank's node, gathered over the default process group, and the resulting grid (the same on
    every rank)."""
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node_id)
    return Placement.from_nodes(nodes, dims.tp)
