"""Measured communication: the collectives a step really runs, by kind and mesh dim, and where its time goes.

`CommCounter` is a TorchDispatchMode over the same ops torch's CommDebugMode watches: DTensor's functional
collectives (TP) and the c10d collectives that FSDP2 and the train loop issue. Unlike CommDebugMode it
records each call's process group and bytes (CommDebugMode keeps counts per module only), and it skips the
per-module tracking that makes CommDebugMode slow. A call is attributed to the mesh dim whose process group
it runs on; bytes follow nccl-tests' message size (see tp2d_exp.perf.analysis, which predicts the same numbers).

`time_split` reads a torch.profiler trace: on GPU the NCCL kernels against the compute kernels, on CPU the
training thread's time inside collective calls (issuing and waiting) against the rest, which is indicative
only: gloo runs on helper threads and the profiler's own overhead lands in compute.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
# Private modules without public equivalents: TorchDispatchMode is the extension point torch's own
# CommDebugMode is built on, tree_flatten walks a dispatched call's arguments.
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tp2d_exp.records import CommTotals, Count, ProfileSplit

_F, _C = torch.ops._c10d_functional, torch.ops.c10d
KINDS: dict[Any, str] = {
    _F.all_reduce: "all_reduce", _F.all_reduce_coalesced: "all_reduce",
    _F.all_gather_into_tensor: "all_gather", _F.all_gather_into_tensor_coalesced: "all_gather",
    _F.reduce_scatter_tensor: "reduce_scatter", _F.reduce_scatter_tensor_coalesced: "reduce_scatter",
    _F.all_to_all_single: "all_to_all", _F.broadcast: "broadcast",
    _C.allreduce_: "all_reduce", _C.allreduce_coalesced_: "all_reduce",
    _C._allgather_base_: "all_gather", _C.allgather_: "all_gather", _C.allgather_coalesced_: "all_gather",
    _C.allgather_into_tensor_coalesced_: "all_gather",
    _C._reduce_scatter_base_: "reduce_scatter", _C.reduce_scatter_: "reduce_scatter",
    _C.reduce_scatter_tensor_coalesced_: "reduce_scatter",
    _C.alltoall_: "all_to_all", _C.alltoall_base_: "all_to_all", _C.broadcast_: "broadcast",
    _C.gather_: "gather", _C.scatter_: "scatter", _C.reduce_: "reduce",
}


def _nbytes(tree: Any) -> int:
    leaves, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _group_name(args: Iterable[Any]) -> str:
    """Functional collectives name their group with a string argument (the last one); c10d ops take the
    ProcessGroup itself, boxed as a TorchScript object."""
    name = None
    for a in args:
        if isinstance(a, str):
            name = a
        elif isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
            return dist.ProcessGroup.unbox(a).group_name
    if name is None:
        raise RuntimeError("collective without a process group argument")
    return name


def _group_ranks(group_name: str) -> tuple[int, ...]:
    """The member ranks of a process group known by name only (functional collectives pass the name).
    Private: torch resolves names to groups only through this c10d internal."""
    return tuple(dist.get_process_group_ranks(dist.distributed_c10d._resolve_process_group(group_name)))


class CommCounter(TorchDispatchMode):
    """Counts calls and message bytes per (mesh dim, collective kind) while active:

        with CommCounter(mesh) as comm:
            train_step(...)
        comm.totals()  # {"tp": {"all_reduce": Count(count=28, bytes=...)}, "dp": {...}}
    """

    def __init__(self, mesh: DeviceMesh):
        super().__init__()
        # By member ranks, not group name: DTensor may run a collective on an equal mesh built earlier in the
        # process (its sharding cache keeps mesh objects), whose groups have other names but the same ranks.
        # dp last, so a group both dims share (tp1_dp1: the world group) counts as dp, where train_step
        # sends its bookkeeping.
        self.dims = {tuple(dist.get_process_group_ranks(mesh[d].get_group())): d for d in ("tp", "dp")}
        self._ranks: dict[str, tuple[int, ...]] = {}
        self.calls: CommTotals = defaultdict(lambda: defaultdict(Count))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor lower to plain ops (its collectives included), then see those
        out = func(*args, **(kwargs or {}))
        kind = KINDS.get(func._overloadpacket)
        if kind is not None:
            group = _group_name([*args, *(kwargs or {}).values()])
            if group not in self._ranks:
                self._ranks[group] = _group_ranks(group)
            entry = self.calls[self.dims.get(self._ranks[group], f"group:{group}")][kind]
            entry.count += 1
            # The largest side of the call: an all-gather's output, a reduce-scatter's input (c10d ops take
            # both as arguments; functional ones return the output).
            entry.bytes += max(max((_nbytes(a) for a in args), default=0), _nbytes(out))
        return out

    def totals(self) -> CommTotals:
        return {d: dict(kinds) for d, kinds in self.calls.items()}


# Profiler events of a collective on the calling thread (CPU): c10d and functional ops, their waits and
# FSDP2's all-gather / reduce-scatter regions (copy-in/out included: that is FSDP's comm overhead).
_COMM_EVENTS = ("c10d::", "_c10d_functional::", "FSDP::all_gather", "FSDP::post_backward", "record_param_comms")
STEP_EVENT = "tp2d::train_step"  # a record_function around each profiled step


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def time_split(prof: torch.profiler.profile) -> Optional[ProfileSplit]:
    """Per-step comm and compute seconds over the profiled steps (each wrapped in STEP_EVENT)."""
    events = prof.events()
    steps = [e for e in events if e.name == STEP_EVENT]
    if not steps:
        return None
    span = lambda e: (e.time_range.start, e.time_range.end)  # noqa: E731 - microseconds
    step_us = _length(_union([span(e) for e in steps]))
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernels:  # GPU: NCCL kernels run beside compute kernels; only what no compute hides is exposed
        comm = _union([span(e) for e in kernels if "nccl" in e.name.lower()])
        compute = _union([span(e) for e in kernels if "nccl" not in e.name.lower()])
        comm_us, exposed_us, source = _length(comm), _length(comm) - _overlap(comm, compute), "nccl kernels"
    else:  # CPU: the training thread inside collective calls, issuing them or waiting for gloo
        thread = steps[0].thread
        comm = _union([span(e) for e in events if e.thread == thread and e.name.startswith(_COMM_EVENTS)])
        backend = _union([span(e) for e in events if e.name.startswith("gloo:")])
        comm_us, exposed_us, source = _length(backend), _length(comm), "cpu collective calls (indicative)"
    n = len(steps)
    return ProfileSplit(steps=n, source=source, step_time_s=step_us / n / 1e6, comm_time_s=comm_us / n / 1e6,
                        exposed_comm_s=exposed_us / n / 1e6, compute_time_s=(step_us - exposed_us) / n / 1e6,
                        comm_share=exposed_us / step_us if step_us else 0.0)
