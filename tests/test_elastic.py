"""Elastic runs on a real Ray cluster on loopback that loses and regains nodes: one run.py job meets every event a
cluster has (a start with a node missing, capacity coming back, a preemption notice with a deadline, a machine
lost mid-step) and its loss at every step is the uninterrupted tp2_dp2 run's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose_job, run_distributed, wandb_history, wandb_run_id, wandb_summary
from tests.test_parity import train_and_collect
from tp2d_exp.records import read_rows
from tp2d_exp.testing.ray_cluster import LoopbackCluster

STEPS = 16
# tp2_dp2 takes micro-batches of 2, accumulating 2 per step at dp2 and 4 at dp1: the same global batch of 8.
SHAPE = ["parallelism=tp2_dp2", "run=debug", f"run.max_steps={STEPS}", "data.seq_length=64", "data.val_fraction=0",
         "run.batch_size_per_gpu=2", "run.global_batch_size=8"]
# Ray marks a lost node dead after its health checks fail (~15 s by default; ~5 s here), Ray Train looks for
# drained nodes every 5 s by default (1 s here) and polls its workers every 2 s (0.5 s here, as tests.conftest).
FAST = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
        "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
DEADLINE_S = 40


def rows_of(run_dir: Path) -> list:
    return read_rows(run_dir / "metrics.jsonl")


def worker_report(run_dir: Path) -> dict:
    path = run_dir / "worker.json"
    return json.loads(path.read_text()) if path.exists() else {"stops": [], "placement": {"node_of_rank": []}}


def wait_for(what: str, proc: subprocess.Popen, ready, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = ready()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"run.py ended (rc {proc.returncode}) while waiting for {what}: "
                                 f"{proc.stderr.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("overrides,slots,dp", [
    (["parallelism=tp2_dp4"], [2, 2, 2, 2], 4),
    (["parallelism=tp2_dp4", "run.global_batch_size=24"], [2, 2, 3], 3),  # a node of 3 holds 1 TP group of 2
    (["parallelism=tp2_dp4", "run.global_batch_size=16"], [2, 2, 2], 2),  # dp3 would split 16 unevenly
    (["parallelism=tp2_dp4", "cluster.min_dp=2"], [2, 1], None),  # below min_dp: wait, do not run
    (["parallelism=tp4_dp2"], [2, 2, 2, 2], 2),  # TP groups wider than any node (launched with a warning)
    (["parallelism=tp2_dp2"], [8], 2),  # never above the configured dp
], ids=["all", "partial_node", "batch_split", "below_min_dp", "tp_wider_than_nodes", "capped"])
def test_the_mesh_after_a_loss_keeps_tp_and_the_global_batch(tmp_path, overrides, slots, dp):
    from tp2d_exp.driver.elastic import largest_dp

    spec = compose_job(tmp_path, [*overrides, "run.batch_size_per_gpu=2"], prepare=False)
    assert largest_dp(spec, slots) == dp


@pytest.mark.slow
def test_a_job_shrinks_and_grows_with_the_cluster_and_keeps_its_loss_curve(tmp_path):
    """Elastic tp2_dp2 (checkpoints every 2 steps, run.max_failures=1) on a cluster of a head and, later, two
    worker nodes, 2 CPUs each:
    1. only the head is up: it starts short, on tp2_dp1 (saying so), accumulating 4 micro-batches a step;
    2. nodes A and B join: it grows to tp2_dp2 at its next checkpoint, redoing nothing;
    3. a node it uses is drained for preemption with a deadline: a checkpoint before the deadline, then
       tp2_dp2 on the two nodes left from exactly there; not a failure;
    4. that node is killed (raylet and workers) after an odd step: tp2_dp1 from the checkpoint one step back,
       that step trained again; the one failure run.max_failures=1 allows.
    Every step's loss equals an uninterrupted tp2_dp2 run's to 1e-5, redone steps included; summary.json and
    W&B record the resizes."""
    run_dir = tmp_path / "run"
    with LoopbackCluster(cpus_per_node=[2], node_env=FAST) as cluster:
        proc = subprocess.Popen(
            [sys.executable, "run.py", *SHAPE, f"cluster.address={cluster.address}", "cluster.elastic=true",
             "run.checkpoint_every=2", "run.num_to_keep=3", "run.max_failures=1", "run.measure_step=0",
             "logger.mode=offline", f"hydra.run.dir={run_dir}", f"cluster.storage_path={tmp_path / 'ray'}",
             f"data.store_dir={tmp_path / 'stores'}"],
            cwd=ROOT, env={**cluster.env, **FAST}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for("the short start", proc, lambda: any(r.dp == 1 for r in rows_of(run_dir)))
            nodes = {cluster.add_node(2), cluster.add_node(2)}
            wait_for("the growth to dp2", proc, lambda: any(r.dp == 2 for r in rows_of(run_dir)))
            # tp2_dp2 over two nodes: each TP group on one node.
            placement = worker_report(run_dir)["placement"]
            assert placement["num_nodes"] == 2 and placement["tp_intra_node"] is True
            assert sorted(placement["tp_groups_per_node"].values()) == [1, 1]
            used = sorted(nodes & set(placement["node_of_rank"]))[0]  # Ray may leave the head out
            cluster.drain_node(used, DEADLINE_S)
            drained_at = time.time()
            [stop_step] = wait_for("the preemption stop", proc, lambda: [
                x["step"] for x in worker_report(run_dir)["stops"] if x["reason"] == "preempted"])
            cluster.kill_node(used)  # the cloud takes the node
            [other] = nodes - {used}
            # Kill the other node just after an odd step past the preemption: the last checkpoint is one step back.
            wait_for("an odd step on the other node", proc, lambda: (r := rows_of(run_dir)[-1]).step > stop_step
                     and r.step % 2 == 1)
            assert other in worker_report(run_dir)["placement"]["node_of_rank"]
            killed_after = rows_of(run_dir)[-1].step
            cluster.kill_node(other)
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = rows_of(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == STEPS and summary["mesh"] == {"tp": 2, "dp": 2}

    # Exact: every step (all are logged, run=debug), redone ones included, has the uninterrupted loss.
    straight = run_distributed(train_and_collect, 4, compose_job(tmp_path / "ref", SHAPE), STEPS)[0]["losses"]
    assert {r.step for r in rows} == set(range(1, STEPS + 1))
    for r in rows:
        assert r.loss == pytest.approx(straight[r.step - 1], abs=1e-5), (r.step, r.dp)

    resizes = summary["resizes"]
    grow, lost = resizes
    assert (grow["reason"], grow["from_mesh"], grow["to_mesh"]) == ("capacity returned", {"tp": 2, "dp": 1},
                                                                    {"tp": 2, "dp": 2})
    assert grow["step"] % 2 == 0 and grow["redone_steps"] == 0 and grow["seconds_lost"] > 0  # at a checkpoint
    # The preemption's checkpoint, committed before the deadline, is where the next start went on: no step lost.
    resize_stop, stop = summary["stops"]
    assert (resize_stop["reason"], resize_stop["step"]) == ("resize", grow["step"])
    assert stop["reason"] == "preempted" and stop["preempted_nodes"] == [used]
    assert drained_at < stop["time"] < stop["deadline"] <= drained_at + DEADLINE_S
    assert [h["resumed_from_step"] for h in summary["restart_history"]] == [grow["step"], stop["step"],
                                                                           lost["step"]]
    assert [r.dp for r in rows if r.step == stop["step"]] == [2]  # trained once
    # The lost node: from the newest checkpoint (one step back, unless the workers got further before they
    # died), the steps since trained again, on tp2_dp1 to the end.
    assert (lost["reason"], lost["from_mesh"], lost["to_mesh"]) == ("node lost", {"tp": 2, "dp": 2},
                                                                   {"tp": 2, "dp": 1})
    assert lost["step"] % 2 == 0 and lost["step"] >= killed_after - 1
    assert lost["redone_steps"] >= 1 and lost["seconds_lost"] > 0
    for step in range(lost["step"] + 1, lost["step"] + lost["redone_steps"] + 1):
        assert [r.dp for r in rows if r.step == step] == [2, 1], step
    assert rows[-1].dp == 1
    assert (summary["failures"], summary["preemptions"], summary["restarts"]) == (1, 1, 3)
    # Never silent: the short start and each resize on stderr and in summary.json's warnings.
    said = [line for line in stderr.splitlines() if line.startswith("warning: cluster.elastic:")]
    assert len(said) == 3 and all(w.removeprefix("warning: ") in summary["warnings"] for w in said), said
    # W&B, offline: each start of the worker group records into its own dir under the job's one run id, with
    # the mesh of every step (dp). A node that dies takes the records its rank 0 had not flushed with it.
    run_id = (run_dir / "wandb_id").read_text()
    runs = sorted(Path(summary["wandb_dir"]).parent.glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 4 and wandb_run_id(summary["wandb_dir"]) == run_id
    assert {h["dp"] for d in runs for h in wandb_history(str(d))} == {1, 2}
    assert wandb_summary(summary["wandb_dir"])["resizes"] == summary["resizes"]
    worst = max(abs(r.loss - straight[r.step - 1]) for r in rows)
    print(f"elastic: resizes {[(x['reason'], x['step'], x['redone_steps'], x['seconds_lost']) for x in resizes]}, "
          f"preemption checkpoint committed {stop['time'] - drained_at:.1f} s after the notice, largest loss "
          f"difference {worst:.1e}, wall {summary['wall_time_s']} s")
