"""What a job measures about itself, beside the loss: collectives on one chosen step, the comm/compute time
split over the next few, per-rank model states (params + grads + optimizer) and peak memory, and MFU, each
next to the analytic prediction.

The train loop wraps each step in `probe.step()`, lets `probe.annotate(row)` add to its log rows and calls
`probe.finish()` on every rank at the end; the returned Measurements go to worker.json (then summary.json)
and the W&B summary. Instrumented steps always get a log row, flagged `instrumented`, so throughput means
can leave them out.
"""

from __future__ import annotations

import resource
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from tp2d_exp.config.spec import JobSpec
from tp2d_exp.perf import analysis
from tp2d_exp.perf.comm import STEP_EVENT, CommCounter, time_split
from tp2d_exp.records import CommReport, CommTotals, MemoryReport, ProfileSplit, StateBytes, StepRow


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> StateBytes:
    """Bytes of this rank's shards of parameters, gradients and optimizer state (what the model predicts)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    size = lambda t: local(t).numel() * local(t).element_size()  # noqa: E731
    params = list(model.parameters())
    return StateBytes(params=sum(size(p) for p in params),
                      grads=sum(size(p.grad) for p in params if p.grad is not None),
                      optimizer=sum(size(v) for s in optimizer.state.values() for v in s.values()
                                    if isinstance(v, torch.Tensor)))


def peak_memory(device: torch.device) -> tuple[int, str, Optional[int]]:
    """(peak, what it is, the CUDA caching allocator's peak reserved memory): the plan's total predicts the
    reserved figure on GPU (what torchtitan's benchmarks publish) and the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated", torch.cuda.max_memory_reserved(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss", None  # Linux: KiB


@dataclass
class Measurements:
    """What `StepProbe.finish` gathers: the worker report's measured part."""

    flops_per_token: float
    peak_flops_per_device: Optional[float]
    memory: MemoryReport
    comm: CommReport


def _comm_row(counted: CommTotals, predicted: CommTotals, spec: JobSpec) -> dict[str, Any]:
    """The measured step's "comm/..." keys: every (dim, kind) counted, bytes per dim against the prediction."""
    out: dict[str, Any] = {}
    for dim, kinds in counted.items():
        for kind, v in kinds.items():
            out[f"{dim}/{kind}/count"], out[f"{dim}/{kind}/bytes"] = v.count, v.bytes
    measured, expected = analysis.dim_bytes(counted, spec.dims), analysis.dim_bytes(predicted, spec.dims)
    for dim in ("tp", "dp"):
        out[f"{dim}_bytes"], out[f"{dim}_bytes_predicted"] = measured[dim].bytes, expected[dim].bytes
    out["matches_prediction"] = counted == predicted
    return out


class StepProbe:
    def __init__(self, spec: JobSpec, mesh, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.spec, self.mesh, self.model, self.optimizer, self.device = spec, mesh, model, optimizer, device
        self.measure_step, self.profile_steps = spec.run.measure_step, spec.run.profile_steps
        self.shape = analysis.StepShape.of(spec, compute_bytes=2 if device.type == "cuda" else 4)
        self.predicted = analysis.predict_collectives(spec.arch, self.shape)
        self.flops_per_token = analysis.flops_per_token(spec.arch, self.shape.seq_length)
        gpu = spec.hardware.gpu_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.peak_flops = gpu.peak_bf16_tflops * 1e12 if gpu else None
        self.steps = 0  # steps this job ran (a resumed job counts from its first step)
        self.instrumented = False  # the last step ran under the counter or the profiler
        self.counted: Optional[CommTotals] = None
        self.model_states: Optional[StateBytes] = None  # this rank's, on the measured step
        self.profile: Optional[ProfileSplit] = None
        self._prof: Optional[torch.profiler.profile] = None

    @contextmanager
    def step(self) -> Iterator[None]:
        self.steps += 1
        n, first, last = self.steps, self.measure_step, self.measure_step + self.profile_steps
        self.instrumented = bool(first) and first <= n <= last
        if n == first:
            hook = self.optimizer.register_step_post_hook(  # gradients still exist until zero_grad
                lambda *_: setattr(self, "model_states", state_bytes(self.model, self.optimizer)))
            try:
                with CommCounter(self.mesh) as counter:
                    yield
            finally:
                hook.remove()
            self.counted = counter.totals()
            return
        if first and n == first + 1 and self.profile_steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.start()
        with torch.profiler.record_function(STEP_EVENT):
            yield
        if n == last and self._prof is not None:
            self._stop_profiler()

    def _stop_profiler(self) -> None:
        self._prof.stop()
        self.profile = time_split(self._prof)
        self._prof = None

    def annotate(self, row: StepRow) -> None:
        """Add MFU and, on an instrumented step, the measurements to the log row of the step just run."""
        if self.peak_flops:
            row.mfu = self.flops_per_token * row.tokens_per_s / (self.peak_flops * self.spec.dims.world_size)
        if not self.instrumented:
            return
        row.instrumented = True
        if self.steps == self.measure_step and self.counted is not None:
            row.comm.update(_comm_row(self.counted, analysis.totals(self.predicted), self.spec))
        if self.steps == self.measure_step + self.profile_steps and self.profile:
            row.comm.update({k: v for k, v in vars(self.profile).items() if k not in ("steps", "source")})

    def finish(self) -> Measurements:
        """Every rank calls this once after training; per-rank figures are gathered over all ranks."""
        if self._prof is not None:  # training ended inside the profiled window
            self._stop_profiler()
        peak, source, reserved = peak_memory(self.device)
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, (peak, self.model_states, reserved))
        predicted = analysis.totals(self.predicted)
        comm = CommReport(predicted=predicted, predicted_bytes=analysis.dim_bytes(predicted, self.spec.dims),
                          predicted_collectives=self.predicted, profile=self.profile)
        if self.counted is not None:
            comm.step, comm.measured = self.measure_step, self.counted
            comm.measured_bytes = analysis.dim_bytes(self.counted, self.spec.dims)
            comm.matches_prediction = self.counted == predicted
        model = analysis.predict_memory(self.spec.arch, self.shape, self.spec.hardware.allocator_overhead)
        memory = MemoryReport(predicted=model, peak_source=source, peak_bytes=max(p for p, _, _ in ranks),
                              peak_bytes_per_rank=[p for p, _, _ in ranks], state_bytes_per_rank=[s for _, s, _ in ranks])
        if reserved is not None:
            memory.peak_reserved_bytes_per_rank = [r for _, _, r in ranks]
            memory.peak_reserved_bytes = max(memory.peak_reserved_bytes_per_rank)
        return Measurements(flops_per_token=self.flops_per_token, peak_flops_per_device=self.peak_flops,
                            memory=memory, comm=comm)


def host_kib(field: str = "VmRSS") -> int:
    """This process's host memory from /proc/self/status, in KiB: VmRSS now, VmHWM the peak since the last
    reset_host_peak (the benchmarks measure CPU ranks, whose model states live there)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_host_peak() -> None:
    """Set VmHWM back to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
