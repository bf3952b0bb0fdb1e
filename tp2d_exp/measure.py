"""What a job measures about itself, beside the loss: collectives on one chosen step, the comm/compute time
split over the next few, per-rank state and peak memory, and MFU, each next to the analytic prediction.

The train loop wraps each step in `probe.step()`, adds `probe.metrics(...)` to its log rows and calls
`probe.finish()` on every rank at the end; the returned dict goes to summary.json and the W&B summary.
Instrumented steps always get a log row, flagged `instrumented`, so throughput means can leave them out.
"""

from __future__ import annotations

import resource
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from tp2d_exp import analysis
from tp2d_exp.comm import STEP_EVENT, CommCounter, time_split


def gpu_spec(hardware: dict[str, Any], device_name: str) -> Optional[dict[str, Any]]:
    """The GPU table row of a device name (torch.cuda.get_device_name): the most specific row whose
    substrings all occur in it."""
    rows = [r for r in hardware["gpus"].values() if all(m in device_name for m in r["match"])]
    return max(rows, key=lambda r: len(r["match"]), default=None)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of this rank's shards of parameters, gradients and optimizer state (what the model predicts)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    size = lambda t: local(t).numel() * local(t).element_size()  # noqa: E731
    params = list(model.parameters())
    return {"params": sum(size(p) for p in params),
            "grads": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(size(v) for s in optimizer.state.values() for v in s.values()
                             if isinstance(v, torch.Tensor))}


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"  # Linux: KiB


class StepProbe:
    def __init__(self, cfg: dict[str, Any], mesh, model: nn.Module, optimizer: torch.optim.Optimizer,
                 accumulation: int, device: torch.device):
        run = cfg["run"]
        self.mesh, self.model, self.optimizer, self.device = mesh, model, optimizer, device
        self.arch = cfg["model"]
        self.measure_step, self.profile_steps = run["measure_step"], run["profile_steps"]
        self.sizes = {"tp": cfg["parallelism"]["tp"], "dp": cfg["parallelism"]["dp"]}
        self.shape = analysis.step_shape(cfg, accumulation, compute_bytes=2 if device.type == "cuda" else 4)
        self.predicted = analysis.predict_collectives(self.arch, self.shape)
        self.flops_per_token = analysis.flops_per_token(self.arch, self.shape.seq_length)
        spec = gpu_spec(cfg["hardware"], torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.peak_flops = spec["peak_bf16_tflops"] * 1e12 if spec else None
        self.steps = 0  # steps this job ran (a resumed job counts from its first step)
        self.instrumented = False  # the last step ran under the counter or the profiler
        self.counted: Optional[dict] = None
        self.state: Optional[dict[str, int]] = None
        self.profile: dict[str, Any] = {}
        self._prof: Optional[torch.profiler.profile] = None

    @contextmanager
    def step(self) -> Iterator[None]:
        self.steps += 1
        n, first, last = self.steps, self.measure_step, self.measure_step + self.profile_steps
        self.instrumented = bool(first) and first <= n <= last
        if n == first:
            hook = self.optimizer.register_step_post_hook(  # gradients still exist until zero_grad
                lambda *_: setattr(self, "state", state_bytes(self.model, self.optimizer)))
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

    def metrics(self, tokens_per_s: float) -> dict[str, Any]:
        """Extra keys for the log row of the step just run."""
        out: dict[str, Any] = {}
        if self.peak_flops:
            world = self.sizes["tp"] * self.sizes["dp"]
            out["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * world)
        if not self.instrumented:
            return out
        out["instrumented"] = True
        if self.steps == self.measure_step and self.counted is not None:
            measured = analysis.dim_bytes(self.counted, self.sizes)
            predicted = analysis.dim_bytes(analysis.totals(self.predicted), self.sizes)
            for dim, kinds in self.counted.items():
                for kind, v in kinds.items():
                    out[f"comm/{dim}/{kind}/count"], out[f"comm/{dim}/{kind}/bytes"] = v["count"], v["bytes"]
            for dim in ("tp", "dp"):
                out[f"comm/{dim}_bytes"] = measured[dim]["bytes"]
                out[f"comm/{dim}_bytes_predicted"] = predicted[dim]["bytes"]
            out["comm/matches_prediction"] = self.counted == analysis.totals(self.predicted)
        if self.steps == self.measure_step + self.profile_steps and self.profile:
            out.update({f"comm/{k}": v for k, v in self.profile.items() if k not in ("steps", "source")})
        return out

    def finish(self) -> dict[str, Any]:
        """Every rank calls this once after training; returns the summary's `comm`, `memory` and FLOPs facts
        (per-rank figures gathered over all ranks)."""
        if self._prof is not None:  # training ended inside the profiled window
            self._stop_profiler()
        peak, source = peak_memory(self.device)
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, {"peak": peak, "state": self.state})
        predicted = analysis.totals(self.predicted)
        out: dict[str, Any] = {
            "flops_per_token": self.flops_per_token, "peak_flops_per_device": self.peak_flops,
            "memory": {"peak_source": source, "peak_bytes": max(r["peak"] for r in ranks),
                       "peak_bytes_per_rank": [r["peak"] for r in ranks],
                       "state_bytes_per_rank": [r["state"] for r in ranks],
                       "predicted": analysis.predict_memory(self.arch, self.shape)},
            "comm": {"predicted": predicted, "predicted_bytes": analysis.dim_bytes(predicted, self.sizes),
                     "predicted_collectives": [asdict(c) for c in self.predicted]},
        }
        if self.counted is not None:
            out["comm"].update(step=self.measure_step, measured=self.counted,
                               measured_bytes=analysis.dim_bytes(self.counted, self.sizes),
                               matches_prediction=self.counted == predicted)
        if self.profile:
            out["comm"]["profile"] = self.profile
        return out
