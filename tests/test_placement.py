"""Topology-aware mesh: TP groups stay inside the node each rank reports, whatever the rank order."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.conftest import run_distributed
from tp2d_exp.config.validate import Capacity
from tp2d_exp.driver.cluster import tp_span_warning
from tp2d_exp.records import PlacementReport
from tp2d_exp.train.mesh import Placement, rank_grid


def test_node_contiguous_ranks_keep_the_row_major_grid():
    assert rank_grid(["a", "a", "b", "b"], tp=2) == [[0, 1], [2, 3]]
    assert rank_grid(["a"] * 8, tp=4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_grid(["a"] * 4 + ["b"] * 4, tp=2) == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("nodes", [
    ["a", "b", "a", "b"],                          # interleaved across two nodes
    ["b", "a", "a", "b"],
    ["a", "b", "c", "a", "b", "c"],                # three nodes, round robin
    ["x", "y", "y", "x", "y", "x", "x", "y"],      # 2 nodes x 4, shuffled, tp=2 -> 2 groups per node
])
def test_shuffled_ranks_still_give_intra_node_tp_groups(nodes):
    tp = 2
    grid = rank_grid(nodes, tp)
    assert sorted(r for row in grid for r in row) == list(range(len(nodes)))
    assert all(len(row) == tp and len({nodes[r] for r in row}) == 1 for row in grid)
    placement = Placement.from_nodes(nodes, tp)
    assert placement.tp_intra_node and placement.warning() is None
    assert sum(placement.describe().tp_groups_per_node.values()) == len(nodes) // tp


def test_tp_four_over_two_nodes_of_four_shuffled():
    nodes = ["n1", "n2", "n2", "n1", "n1", "n2", "n1", "n2"]
    placement = Placement.from_nodes(nodes, tp=4)
    assert placement.grid == ((0, 3, 4, 6), (1, 2, 5, 7))
    assert placement.describe().tp_groups_per_node == {"n1": 1, "n2": 1}
    assert placement.coordinate(6) == (0, 3) and placement.coordinate(1) == (1, 0)


def test_tp_larger_than_a_node_is_reported_once_with_the_split_groups():
    placement = Placement.from_nodes(["a", "a", "b", "b"], tp=4)
    assert placement.grid == ((0, 1, 2, 3),)
    described = placement.describe()
    assert described.tp_intra_node is False and described.tp_groups_per_node == {"a": 0, "b": 0}
    warning = placement.warning()
    assert "[[0, 1, 2, 3]] span nodes" in warning and "ranks per node [2, 2]" in warning


def test_the_driver_reads_the_reported_placement_back_into_its_warning(tmp_path):
    """The driver rebuilds the placement from the worker report's JSON (summary.json's `placement`)."""
    from tp2d_exp.records import read_json, write_json

    spanning = Placement.from_nodes(["a", "a", "a", "b"], tp=2)
    write_json(tmp_path / "placement.json", spanning.describe())
    reported = read_json(PlacementReport, tmp_path / "placement.json")
    assert Placement.from_report(reported).warning() == spanning.warning()
    assert Placement.from_report(Placement.from_nodes(["a", "b"] * 2, tp=2).describe()).warning() is None


def test_a_tp_wider_than_every_node_is_predicted_before_launch():
    two_by_four = Capacity(use_gpu=True, kind="GPU", per_worker=1.0, total=8, free=8,
                           workers_per_node={"a": 4, "b": 4})
    assert tp_span_warning(4, two_by_four) is None
    warning = tp_span_warning(8, two_by_four)
    assert warning.startswith("parallelism.tp=8 is larger than any node holds (at most 4 workers per node)")


def test_uneven_nodes_keep_as_many_whole_groups_as_possible():
    # 3 ranks on a, 1 on b: one whole group on a; the leftovers (rank 2 on a, rank 3 on b) span nodes.
    placement = Placement.from_nodes(["a", "a", "a", "b"], tp=2)
    assert placement.grid == ((0, 1), (2, 3))
    assert placement.describe().tp_groups_per_node == {"a": 1, "b": 0}
    assert not placement.tp_intra_node


def _train_on_nodes(job: dict, layouts: list[list[str]]) -> list[dict]:
    """On each rank: for each node layout, set up (mesh from the gathered nodes) and train two steps."""
    import torch.distributed as dist

    from tp2d_exp.train.loop import setup, train_step

    rank = dist.get_rank()
    out = []
    for nodes in layouts:
        j = setup(job, torch.device("cpu"), node_id=nodes[rank])
        batch = torch.cat([j.dataset.batch(i).input_ids for i in j.order.micro_batches(0, 0, j.dp_rank)])
        losses = [train_step(j, 0, s).loss for _, s in itertools.islice(j.order.steps(0, 0, 1), 2)]
        out.append({"coordinate": list(j.mesh.get_coordinate()), "tp_group": sorted(j.mesh["tp"].mesh.tolist()),
                    "dp_rank": j.dp_rank, "batch": batch, "losses": losses})
    return out


@pytest.mark.slow  # a second 4-rank training (~5 s)
def test_shuffled_nodes_give_node_local_tp_groups_and_the_same_training(job_factory):
    """Ranks 0, 2 on one node and 1, 3 on another (an order Ray could hand out): TP groups follow the nodes,
    the dp coordinate (not rank // tp) picks the data, and the losses equal the row-major layout's."""
    job = job_factory(["parallelism=tp2_dp2", "run=debug", "data.synthetic_documents=300", "data.seq_length=64",
                       "model.num_hidden_layers=2"])
    natural, shuffled = ["a", "a", "b", "b"], ["a", "b", "a", "b"]
    ranks = run_distributed(_train_on_nodes, 4, job, [natural, shuffled])
    assert [r[0]["tp_group"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r[1]["tp_group"] for r in ranks] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r[1]["coordinate"] for r in ranks] == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert [r[1]["dp_rank"] for r in ranks] == [0, 1, 0, 1]
    assert torch.equal(ranks[0][1]["batch"], ranks[2][1]["batch"])  # a TP group shares its batch
    assert not torch.equal(ranks[0][1]["batch"], ranks[1][1]["batch"])
    assert torch.equal(ranks[1][1]["batch"], ranks[2][0]["batch"])  # dp coordinate 1 takes the same slice
    for r in ranks:
        assert r[1]["losses"] == pytest.approx(ranks[0][0]["losses"], rel=1e-5)
