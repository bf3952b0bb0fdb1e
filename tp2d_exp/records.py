"""Typed records of what a job writes down, and their JSON form (one reader and one writer for all of them):

    metrics.jsonl   StepRow per logged step (rank 0)
    eval.json       EvalReport of scripts/evaluate.py (rank 0)
    worker.json     WorkerReport: rank 0's account of the job's attempts and measurements, for the driver
    summary.json    RunSummary: the driver's result of the job (the worker report merged in); the sweep report
                    and tools read it back through the same type

JSON keys are the field names; a field that is None is left out.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from tp2d_exp.storage import atomic_write

if TYPE_CHECKING:
    from tp2d_exp.config.spec import JobSpec

T = TypeVar("T")

WORKER_FILE = "worker.json"  # in the run dir, next to metrics.jsonl and summary.json
EVAL_FILE = "eval.json"  # in scripts/evaluate.py's run dir
RESIZE_REQUEST_FILE = "resize_request.json"  # the driver asks the workers to stop at their next checkpoint


class RunStatus(StrEnum):
    completed = "completed"
    failed = "failed"
    planned = "planned"  # run.plan_only: a prediction, nothing ran


class FailureKind(StrEnum):
    config = "config"  # a value that cannot work, found before any worker started
    resources = "resources"  # the cluster cannot serve the job (too few devices, busy past cluster.resource_wait_s)
    nonfinite = "nonfinite"  # a non-finite loss or gradient norm under run.nonfinite=stop
    worker_fault = "worker_fault"  # a worker raised or was lost more often than run.max_failures allows


# ---- communication and memory (tp2d_exp.perf)


@dataclass
class Count:
    """Collectives of one kind on one mesh dim in one optimizer step: calls and message bytes per rank."""

    count: int = 0
    bytes: int = 0


CommTotals = dict[str, dict[str, Count]]  # mesh dim -> collective kind -> Count


@dataclass
class DimBytes:
    bytes: float  # message bytes (nccl-tests' convention)
    wire_bytes: float  # what a rank sends with ring algorithms


@dataclass
class Collective:
    """One line of the analytic model: a collective a step runs `count` times."""

    purpose: str
    dim: str  # mesh dim: "tp" or "dp"
    kind: str  # all_reduce | all_gather | reduce_scatter
    count: int  # calls per optimizer step
    bytes: int  # message bytes per call and rank


@dataclass
class ProfileSplit:
    """Where the profiled steps' time went (torch.profiler; indicative only on CPU)."""

    steps: int
    source: str
    step_time_s: float
    comm_time_s: float
    exposed_comm_s: float
    compute_time_s: float
    comm_share: float


@dataclass
class Link:
    link: str  # intra_node | inter_node
    gbps: float
    latency_us: float


@dataclass
class CommReport:
    predicted: CommTotals
    predicted_bytes: dict[str, DimBytes]
    predicted_collectives: list[Collective]
    step: Optional[int] = None  # the measured step (run.measure_step)
    measured: Optional[CommTotals] = None
    measured_bytes: Optional[dict[str, DimBytes]] = None
    matches_prediction: Optional[bool] = None
    profile: Optional[ProfileSplit] = None
    # plan_only: the time model on the hardware profile
    predicted_time_s: Optional[dict[str, float]] = None
    links: Optional[dict[str, Link]] = None
    rough_tutorial_bytes: Optional[dict[str, int]] = None


@dataclass
class StateBytes:
    """A rank's shards of the model states: parameters, gradients, optimizer state."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass
class MemoryPrediction:
    """Bytes per rank at the predicted peak (tp2d_exp.perf.analysis.predict_memory): params, grads and optimizer
    exact; the rest modelled, at the step's phase that peaks."""

    params: int
    grads: int
    optimizer: int
    gathered_params: int  # FSDP2's unsharded groups alive at the peak
    activations: int  # saved for backward by every decoder layer
    total: int  # the figure a measured peak compares to: GPU reserved, or CPU process RSS
    loss: int = 0  # the cross-entropy's buffers
    transient: int = 0  # unsharded gradients, recomputation, activation gradients, optimizer temporaries
    peak_phase: str = ""  # loss | layer backward | optimizer
    allocated: int = 0  # tensor bytes at the peak (total less allocator overhead or process baseline)

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass
class MemoryReport:
    predicted: MemoryPrediction
    peak_source: Optional[str] = None  # cuda_max_allocated | process_peak_rss
    peak_bytes: Optional[int] = None
    peak_bytes_per_rank: Optional[list[int]] = None
    state_bytes_per_rank: Optional[list[Optional[StateBytes]]] = None
    # GPU runs: the caching allocator's peak reserved memory (what the plan's total predicts)
    peak_reserved_bytes: Optional[int] = None
    peak_reserved_bytes_per_rank: Optional[list[int]] = None
    # plan_only, and the guard before a real launch
    gpu_memory_bytes: Optional[float] = None
    usable_bytes: Optional[float] = None  # the GPU's memory less the CUDA context
    fits: Optional[bool] = None


@dataclass
class PlanFacts:
    """run.plan_only's time model of one step on a hardware profile."""

    hardware: str
    gpu: str
    nodes: int
    compute_time_s: float  # GEMMs, attention, memory-bound work, recomputation (tp2d_exp.perf.timing)
    tp_exposed_s: float  # TP collectives: on the critical path
    dp_time_s: float  # every dp collective, as if alone on the link
    dp_exposed_s: float  # what of it compute does not hide
    exposed_comm_s: float
    step_time_s: float
    comm_share: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    mfu: float
    gemm_efficiency: float  # the GPU row's, large GEMMs


# ---- where ranks ran, restarts


@dataclass
class PlacementReport:
    """The node of every rank and how the mesh grouped them (tp2d_exp.train.mesh.Placement)."""

    num_nodes: int
    node_of_rank: list[str]
    tp_groups: list[list[int]]  # rows of the (dp, tp) rank grid
    tp_groups_per_node: dict[str, int]  # whole TP groups each node holds
    tp_intra_node: bool


@dataclass
class FaultRecord:
    """An injected worker fault (run.fault), as its marker file records it."""

    step: int
    rank: int
    mode: str
    time: float


@dataclass
class RestartRecord:
    attempt: int
    resumed_from_step: Optional[int] = None  # None: the restart began before the first checkpoint
    checkpoint: Optional[str] = None
    fault: Optional[FaultRecord] = None
    restart_s: Optional[float] = None  # from the injected fault to the first step after the restart


@dataclass
class Mesh:
    tp: int
    dp: int

    @property
    def name(self) -> str:
        return f"tp{self.tp}_dp{self.dp}"


@dataclass
class ResizeRecord:
    """A change of mesh within one job (cluster.elastic, tp2d_exp.driver.elastic): the driver fills the reason and
    the meshes, the new mesh's rank 0 the rest once it has restored."""

    reason: str  # node lost | preempted | capacity returned
    from_mesh: Mesh
    to_mesh: Mesh
    step: Optional[int] = None  # the checkpoint's step the new mesh went on from (0: none yet, from the start)
    redone_steps: Optional[int] = None  # steps trained after that checkpoint on the old mesh, trained again
    # From the end of that checkpoint's step on the old mesh to the first step on the new one: the redone
    # steps, noticing the loss, and starting and restoring the new worker group.
    seconds_lost: Optional[float] = None


@dataclass
class StopRecord:
    """Why the workers ended a start of the worker group early, right after a committed checkpoint."""

    reason: str  # preempted (Ray's preemption notice) | resize (the driver asked for a larger mesh)
    step: int  # the checkpoint's
    time: float  # when the checkpoint was committed
    preempted_nodes: list[str] = field(default_factory=list)  # Ray node ids being drained
    deadline: Optional[float] = None  # when Ray said the preempted nodes go (unix seconds)


# ---- the files


@dataclass
class EvalReport:
    """eval.json of scripts/evaluate.py: a checkpoint's held-out loss on the mesh it was loaded onto."""

    checkpoint: str
    step: int
    samples_consumed: int
    mesh: Mesh
    val_loss: float
    val_ppl: float
    val_tokens: int
    val_samples: int


@dataclass
class StepRow:
    """One row of metrics.jsonl (and of the W&B history)."""

    step: int
    epoch: int
    loss: float  # token-mean over the global batch, the same on every rank
    lr: float  # the schedule's LR at samples_consumed: the next step's (the last row's is the run's final LR)
    grad_norm: float
    samples_consumed: int
    skipped_steps: int
    tokens_per_s: float
    useful_tokens_per_s: float
    tokens_per_s_per_device: float
    step_time_s: float
    instrumented: bool = False  # counted or profiled: carries measurement overhead (tp2d_exp.perf.measure)
    mfu: Optional[float] = None  # GPUs in the hardware table only
    # Held-out evaluation after this step (tp2d_exp.train.evaluate): token-mean loss, its perplexity and the
    # tokens scored, the same on every mesh. W&B shows them in its val/ section (val/loss, val/ppl, ...).
    val_loss: Optional[float] = None
    val_ppl: Optional[float] = None
    val_tokens: Optional[int] = None
    val_time_s: Optional[float] = None  # what the evaluation cost (left out of the training throughput)
    comm: dict[str, Any] = field(default_factory=dict)  # written as "comm/<key>"
    time: Optional[float] = None  # when the step ended (unix seconds)
    dp: Optional[int] = None  # the mesh's dp at this step: changes where an elastic run resized

    def flat(self) -> dict[str, Any]:
        row = {k: v for k, v in to_dict(self).items() if k != "comm"}
        row.update({f"comm/{k}": v for k, v in self.comm.items()})
        return row

    @classmethod
    def parse(cls, line: str) -> "StepRow":
        raw = json.loads(line)
        comm = {k.removeprefix("comm/"): raw.pop(k) for k in list(raw) if k.startswith("comm/")}
        return from_dict(cls, {**raw, "comm": comm})


def read_rows(path: Path) -> list[StepRow]:
    """The complete rows of a metrics.jsonl (none when it does not exist)."""
    if not path.exists():
        return []
    return [StepRow.parse(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class StoreRecord:
    """A source's token store, as the driver found or built it (tp2d_exp.data.dataset.build_stores)."""

    key: str  # data, or data.mixture[i]
    source: str
    path: str
    weight: float
    tokenizer: str  # the identity of the tokenizer that wrote it
    tokens: int  # in its training split
    samples: int
    digest: str  # of its training split's content
    heldout_samples: int
    documents: int
    build_s: float
    built_by: str
    reused: bool


@dataclass
class WorkerReport:
    """Rank 0's worker.json: one entry per start of the worker group, what the job measured, and how it ended
    when it ended by itself (a non-finite stop)."""

    attempts: Optional[int] = None  # starts of the worker group; None: none started
    restarts: Optional[int] = None
    restart_history: Optional[list[RestartRecord]] = None
    resumed_from_step: Optional[int] = None
    resumed_from: Optional[str] = None
    already_done: Optional[bool] = None  # resumed at or past the last step: nothing left to train
    wandb_dir: Optional[str] = None
    placement: Optional[PlacementReport] = None
    failure: Optional[FailureKind] = None
    error: Optional[str] = None
    flops_per_token: Optional[float] = None
    peak_flops_per_device: Optional[float] = None
    memory: Optional[MemoryReport] = None
    comm: Optional[CommReport] = None
    # Training time each checkpoint save blocked (rank 0): the whole write when synchronous; staging plus
    # the commit when run.checkpoint_async (the write itself overlaps the next steps).
    checkpoint_stall_s: Optional[float] = None
    checkpoint_stalls_s: Optional[list[float]] = None
    # data.source=mixture: how many times each source was read through by the end of the run
    source_passes: Optional[dict[str, float]] = None
    started_at: Optional[float] = None  # when the first start of the worker group began training (unix seconds)
    resizes: Optional[list[ResizeRecord]] = None  # cluster.elastic: every change of mesh
    stops: Optional[list[StopRecord]] = None  # starts that ended early, after a checkpoint (preemption, resize)


@dataclass
class RunSummary(WorkerReport):
    """summary.json: the driver's result of one job, with the worker report merged in."""

    status: RunStatus = RunStatus.failed
    run_name: str = ""
    mesh: Optional[Mesh] = None
    world_size: Optional[int] = None
    global_batch_size: Optional[int] = None
    end_samples: Optional[int] = None  # where the run's schedule ends (samples from the run's start)
    model_dir: Optional[str] = None
    tokenizer_dir: Optional[str] = None
    checkpoint: Optional[str] = None
    device: Optional[str] = None
    ray_connect_s: Optional[float] = None
    data_stores: Optional[list[StoreRecord]] = None  # each source's token store: built (how fast) or reused
    wandb_group: Optional[str] = None  # the W&B group of the job's run (the sweep report logs into it)
    wall_time_s: Optional[float] = None
    warnings: Optional[list[str]] = None
    # Worker-group starts that ended in a failure (counted against run.max_failures) and in a preemption (not)
    failures: Optional[int] = None
    preemptions: Optional[int] = None
    # from metrics.jsonl (throughput means leave out the first window and instrumented steps)
    steps: Optional[int] = None
    samples_consumed: Optional[int] = None  # by the run, at its last step (a resumed run's included)
    final_lr: Optional[float] = None
    first_loss: Optional[float] = None
    final_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    useful_tokens_per_s: Optional[float] = None
    tokens_per_s_per_device: Optional[float] = None
    step_time_s: Optional[float] = None
    mfu: Optional[float] = None
    # held-out evaluation (data.val_fraction): the last one, and the best one with its step
    final_val_loss: Optional[float] = None
    best_val_loss: Optional[float] = None
    best_val_step: Optional[int] = None
    # plan_only
    model: Optional[str] = None
    params: Optional[int] = None
    plan: Optional[PlanFacts] = None

    @classmethod
    def of(cls, spec: JobSpec, status: RunStatus = RunStatus.failed, **facts: Any) -> "RunSummary":
        """A job's summary before anything ran: what the spec says (until launch says otherwise, failed)."""
        r, dims = spec.resolved, spec.dims
        return cls(status=status, run_name=r.run_name, mesh=Mesh(tp=dims.tp, dp=dims.dp), world_size=dims.world_size,
                   global_batch_size=r.global_batch_size,
                   end_samples=r.schedule.end_samples if r.schedule else None,
                   model_dir=r.model_dir or None, tokenizer_dir=r.tokenizer_dir or None,
                   data_stores=list(r.stores) or None,
                   wandb_group=r.wandb.group if r.wandb else None, **facts)

    @property
    def never_started(self) -> bool:
        """Failed before any worker started: a bad value, or a cluster that cannot serve the job (exit code 2)."""
        return self.failure in (FailureKind.config, FailureKind.resources)

    @property
    def mesh_name(self) -> str:
        return self.mesh.name if self.mesh else "tp?_dp?"


# ---- JSON


def to_dict(obj: Any) -> Any:
    """A record as plain JSON values: enums by value, None fields left out, a record's own fields before the
    ones it inherits (summary.json starts with status, not with the worker report's fields)."""
    if dataclasses.is_dataclass(obj):
        own = vars(type(obj)).get("__annotations__", {})
        ordered = sorted(dataclasses.fields(obj), key=lambda f: f.name not in own)
        return {f.name: to_dict(v) for f in ordered if (v := getattr(obj, f.name)) is not None}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type[T], data: Any) -> T:
    """The inverse of to_dict for a type built of records, enums, Optional, list and dict."""
    return _convert(cls, data)


def _convert(tp: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        return _convert(next(a for a in typing.get_args(tp) if a is not type(None)), data)
    if origin is list:
        return [_convert(typing.get_args(tp)[0], v) for v in data]
    if origin is dict:
        return {k: _convert(typing.get_args(tp)[1], v) for k, v in data.items()}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        values = {f.name: _convert(hints[f.name], data[f.name]) for f in dataclasses.fields(tp) if f.name in data}
        # to_dict leaves None out: an Optional field without a default is None when absent.
        values.update({f.name: None for f in dataclasses.fields(tp) if f.name not in data and _optional(hints[f.name])
                       and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})
        return tp(**values)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    return data


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)


def write_json(path: Path, record: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(to_dict(record), indent=2))


def read_json(cls: type[T], path: Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))
