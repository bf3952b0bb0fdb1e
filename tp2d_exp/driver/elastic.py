"""One job as a loop of Ray Train runs (TorchTrainer.fit), each on the mesh the cluster holds now and each going
on from the newest committed checkpoint: elastic runs (cluster.elastic) and preemptions.

- A preemption (Ray's drain notice, ray.train.get_preemption_info) makes the workers commit a checkpoint and
  return (tp2d_exp.train.loop.Interrupts); the next fit goes on from it, so no step is lost. It is counted
  apart from failures and never uses up run.max_failures.
- Elastic, a lost node (or any worker failure) ends the fit; the next one runs on the largest dp' <= dp that
  the remaining nodes hold in whole TP groups and for which the global batch is still a whole number of
  micro-batches per rank (gradient accumulation keeps it). The loss curve is the full mesh's: the batch order,
  the token-mean loss and the checkpoint do not depend on the mesh (DESIGN.md).
- Elastic, on a short mesh a watcher asks the workers (a file in the run dir) to stop after their next committed
  checkpoint once the configured mesh fits again; the next fit grows back, losing no step.
Not elastic, worker failures are Ray Train's to retry (FailureConfig.max_failures), on the same mesh.

Why a driver loop rather than Ray Train V2's elastic ScalingConfig(num_workers=(min, max)): Ray picks any worker
count in the range, with no rule that it be a multiple of tp or keep whole TP groups on a node, leaves the
global batch to the user, and grows at a monitor tick, not at a checkpoint (the steps since the last one are
lost). Here each resize is a plain restart on a mesh the driver chose and says, from a checkpoint, with the
same code path as a same-name rerun.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional

from tp2d_exp.config.errors import ResourceError
from tp2d_exp.config.spec import JobSpec
from tp2d_exp.config.validate import Capacity
from tp2d_exp.records import RESIZE_REQUEST_FILE, WORKER_FILE, Mesh, ResizeRecord, WorkerReport, read_json

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often the watcher looks for returned capacity (ray.nodes() on the GCS: cheap)
PROBE_S = 10.0  # how long a node that ran a failed worker has to answer before it counts as lost
MAX_START_FAILURES = 3


def largest_dp(spec: JobSpec, slots: Iterable[int]) -> Optional[int]:
    """The largest dp' <= parallelism.dp (and >= cluster.min_dp) whose tp*dp' workers the nodes hold, each TP
    group on one node, and that keeps the global batch a whole number of micro-batches per rank; None if none.
    `slots`: workers each node holds. A job whose TP groups cannot fit a node at all (tp above the largest
    node; launched with a warning) counts all slots together."""
    slots = list(slots)
    tp, mbs, gbs = spec.dims.tp, spec.run.batch_size_per_gpu, spec.resolved.global_batch_size
    groups = sum(s // tp for s in slots) if tp <= max(slots, default=0) else sum(slots) // tp
    for dp in range(min(spec.dims.dp, groups), spec.cluster.min_dp - 1, -1):
        if gbs % (mbs * dp) == 0:
            return dp
    return None


def node_slots(capacity: Capacity, gone: set[str]) -> dict[str, int]:
    """Workers each alive node holds (its whole resource, this job's own workers included), leaving out the
    nodes this job saw go (preempted or lost: a node that comes back is a new node id)."""
    import ray

    return {n["NodeID"]: int(n["Resources"].get(capacity.kind, 0) // capacity.per_worker)
            for n in ray.nodes() if n["Alive"] and n["NodeID"] not in gone}


def _alive() -> bool:
    return True


def lost_nodes(nodes: set[str], wait_s: float) -> set[str]:
    """Of the nodes a failed fit's workers ran on, those that are gone. Ray marks a node dead only once its
    health checks fail (seconds to a minute after), so each node gets a task pinned to it: one that does not
    answer is lost, and is waited for (up to wait_s) until Ray says so too, lest the next fit's placement
    group be put on it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def alive_in_gcs() -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    candidates = nodes & alive_in_gcs()
    probe = ray.remote(_alive)
    refs = {node: probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote() for node in candidates}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_S) if refs else ([], [])
    answered = set()
    for node, ref in refs.items():
        if ref in ready:
            try:
                ray.get(ref)
                answered.add(node)
            except Exception:  # noqa: BLE001 - a task that could not run there: the node is gone
                pass
    lost = nodes - answered
    deadline = time.monotonic() + wait_s
    while lost & alive_in_gcs() and time.monotonic() < deadline:
        time.sleep(0.5)
    return lost


class GrowWatch(threading.Thread):
    """While a fit runs short (dp below the configured one), ask its workers to stop after their next checkpoint
    once a larger mesh fits."""

    def __init__(self, configured: JobSpec, dp: int, capacity: Capacity, gone: set[str], out: Path):
        super().__init__(name="elastic-grow-watch", daemon=True)
        self.configured, self.dp, self.capacity, self.gone = configured, dp, capacity, gone
        self.request = out / RESIZE_REQUEST_FILE
        self.stop = threading.Event()

    def run(self) -> None:
        import ray

        tp, each = self.configured.dims.tp, self.capacity.per_worker
        while not self.stop.wait(POLL_S):
            try:
                slots = node_slots(self.capacity, self.gone).values()
                # Free besides this job's own workers: what other jobs hold is not there to grow into.
                free = ray.available_resources().get(self.capacity.kind, 0) + tp * self.dp * each
            except Exception:  # noqa: BLE001 - a GCS hiccup: look again at the next tick
                log.debug("grow watch: could not read the cluster", exc_info=True)
                continue
            dp = largest_dp(self.configured, slots)
            while dp and dp > self.dp and tp * dp * each > free:
                dp = largest_dp(self.configured.with_dp(dp - 1), slots)
            if dp and dp > self.dp:
                log.info("elastic: tp%d_dp%d fits again; the workers stop at their next checkpoint",
                         self.configured.dims.tp, dp)
                self.request.write_text(json.dumps({"dp": dp, "time": time.time()}))
                return


@dataclass
class Attempts:
    """What the loop saw: failures count against run.max_failures, preemptions do not."""

    failures: int = 0
    preemptions: int = 0
    start_failures: int = 0  # fits in a row whose workers never began (retried up to MAX_START_FAILURES times)
    gone: set[str] = field(default_factory=set)  # nodes preempted or lost
    warnings: list[str] = field(default_factory=list)


def _worker_report(out: Path) -> WorkerReport:
    """Rank 0's worker.json: each start of the worker group (recorded before anything else) and each early stop."""
    path = out / WORKER_FILE
    return read_json(WorkerReport, path) if path.exists() else WorkerReport()


def _say(attempts: Attempts, message: str) -> None:
    """A resize is never silent: the run log, stderr and summary.json's warnings."""
    log.warning("%s", message)
    print(f"warning: {message}", file=sys.stderr)
    attempts.warnings.append(message)


def _choose_dp(configured: JobSpec, capacity: Capacity, attempts: Attempts) -> int:
    """The mesh the next fit runs on: the configured one unless elastic, else the largest that fits now,
    waiting up to cluster.resource_wait_s for one to fit at all."""
    c = configured.cluster
    if not c.elastic:
        return configured.dims.dp
    deadline = time.monotonic() + c.resource_wait_s
    while True:
        slots = node_slots(capacity, attempts.gone)
        dp = largest_dp(configured, slots.values())
        if dp is not None:
            return dp
        if time.monotonic() > deadline:
            raise ResourceError(
                f"cluster.elastic: the remaining nodes hold {sum(slots.values())} workers "
                f"({'+'.join(map(str, slots.values())) or 'none'}), fewer than tp*cluster.min_dp = "
                f"{configured.dims.tp}*{c.min_dp} in whole TP groups, and none were freed within "
                f"cluster.resource_wait_s={c.resource_wait_s:g}s; add nodes and rerun with the same "
                "run.name (it goes on from its newest checkpoint)")
        time.sleep(POLL_S)


def run_fits(configured: JobSpec, capacity: Capacity, fit: Callable[[JobSpec], object], out: Path,
             attempts: Attempts, describe: Callable[[BaseException], str]) -> object:
    """Fit until the run ends: after a preemption or a resize stop (and, elastic, after a failure) again from
    the newest checkpoint, on the mesh _choose_dp picks. Returns the last fit's result; raises the error of a
    failure beyond run.max_failures. `describe`: a failure as one line, for the run log."""
    import ray.train

    elastic, tp = configured.cluster.elastic, configured.dims.tp
    dp = _choose_dp(configured, capacity, attempts)
    if dp < configured.dims.dp:
        _say(attempts, f"cluster.elastic: the cluster holds tp{tp}_dp{dp}, not {configured.dims.name}: starting on "
             f"tp{tp}_dp{dp} with {configured.with_dp(dp).accumulation_steps} micro-batches per step (same global "
             f"batch); it grows to {configured.dims.name} at the first checkpoint after the nodes are there")
    resize: Optional[ResizeRecord] = None
    while True:
        spec = configured.with_dp(dp).with_resolved(resize=resize)
        (out / RESIZE_REQUEST_FILE).unlink(missing_ok=True)
        watch = None
        if elastic and dp < configured.dims.dp:
            watch = GrowWatch(configured, dp, capacity, attempts.gone, out)
            watch.start()
        before = _worker_report(out)
        try:
            result, error = fit(spec), None
        except Exception as e:  # noqa: BLE001 - classified below
            result, error = None, e
        finally:
            if watch is not None:
                watch.stop.set()
                watch.join()
        after = _worker_report(out)
        stops, started = (after.stops or [])[len(before.stops or []):], after.attempts != before.attempts
        if stops:
            # The workers stopped after a committed checkpoint; an error after that (the preempted node taken
            # while the worker group shut down) loses nothing and is not a failure.
            if stops[-1].reason == "preempted":
                attempts.preemptions += 1
                attempts.gone |= set(stops[-1].preempted_nodes)
                reason = "preempted"
            else:
                reason = "capacity returned"
        elif error is None:
            return result
        elif not elastic:
            raise error
        elif not started and attempts.start_failures < MAX_START_FAILURES:
            # No worker began (Ray cancelled an actor of the new group, a node went as it started): nothing was
            # trained, so nothing failed in training; start again on what the cluster holds then.
            attempts.start_failures += 1
            log.warning("the workers on tp%d_dp%d did not start (%s); starting again", tp, dp, describe(error))
            time.sleep(POLL_S)
            reason = "workers did not start"
        elif isinstance(error, ray.train.PreemptionError):  # the deadline came before the workers' checkpoint
            attempts.preemptions += 1
            attempts.gone |= set(error.preemption_info.preempted_node_ids)
            reason = "preempted"
        else:
            log.warning("the workers on tp%d_dp%d failed: %s", tp, dp, describe(error))
            attempts.failures += 1
            limit = configured.run.max_failures
            if limit != -1 and attempts.failures > limit:
                raise error
            placed = set(after.placement.node_of_rank) if after.placement else set()
            lost = lost_nodes(placed, configured.cluster.resource_wait_s)
            attempts.gone |= lost
            reason = "node lost" if lost else "worker failed"
        said = None
        if started:
            attempts.start_failures = 0
        elif resize is not None:  # that resize never happened: the next start makes it, from the same mesh
            reason, dp, said = resize.reason, resize.from_mesh.dp, resize.to_mesh.dp
        new_dp = _choose_dp(configured, capacity, attempts)
        resize = None
        if new_dp != dp:
            resize = ResizeRecord(reason=reason, from_mesh=Mesh(tp=tp, dp=dp), to_mesh=Mesh(tp=tp, dp=new_dp))
            announce = log.warning if new_dp == said else partial(_say, attempts)  # said once, not per retry
            announce(f"cluster.elastic: {reason}: going on from the newest checkpoint on tp{tp}_dp{new_dp} (was "
                     f"tp{tp}_dp{dp}), {configured.with_dp(new_dp).accumulation_steps} micro-batches per step, same "
                     "global batch")
        else:
            log.warning("%s: going on from the newest checkpoint on tp%d_dp%d", reason, tp, dp)
        dp = new_dp
