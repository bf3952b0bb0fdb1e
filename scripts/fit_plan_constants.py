"""Fit the planner's free constants on torchtitan's published Llama-3.1-8B FSDP runs (H100 96 GB HBM2e, 500 W;
benchmarks/llama3_h100_202412_torchtitan.md, tables 1 and 3, the rows without torch.compile) and print them
for conf/hardware/gpus.yaml and the hardware profiles:

    python scripts/fit_plan_constants.py

- hardware.allocator_overhead: reserved / modelled allocated peak - 1, the mean over the two rows;
- gemm_efficiency x the 96 GB part's peak: the two rows run the same shapes, so they pin only the product
  (the effective FLOP rate of large GEMMs and attention). The peak is taken as the middle of the range
  torchtitan's footnote gives (between H100 NVL's 835 and SXM's 989 dense bf16 TFLOP/s) and the efficiency
  fitted: the value minimising the squared relative error of TPS/GPU over both rows.
Nothing TP-specific is fitted: TP plans use these constants and first principles (tp2d_exp.perf.timing).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tp2d_exp.config.spec import JobSpec  # noqa: E402
from tp2d_exp.testing.jobs import compose_job  # noqa: E402

GiB = 2**30
# (dp, global batch, TPS/GPU, max reserved GiB): tables 1 and 3, FSDP without compile
PUBLISHED = [(8, 16, 5762, 82.4), (128, 256, 5605, 67.0)]
BASE = ["model=llama3_8b", "data.seq_length=8192", "run.batch_size_per_gpu=2",
        "run.activation_checkpointing=selective", "hardware=h100_nvlink_ib", "hardware.gpu=h100_96gb",
        "parallelism.tp=1", "logger=none"]
PEAK_TFLOPS = (835 + 989) / 2


def specs(tmp: Path) -> list[JobSpec]:
    return [compose_job(tmp / str(dp), [*BASE, f"parallelism.dp={dp}", f"run.global_batch_size={gbs}"], prepare=False)
            for dp, gbs, _, _ in PUBLISHED]


def with_gpu(spec: JobSpec, **row) -> JobSpec:
    hw = spec.hardware
    gpus = {**hw.gpus, hw.gpu: dataclasses.replace(hw.gpus[hw.gpu], **row)}
    return dataclasses.replace(spec, hardware=dataclasses.replace(hw, gpus=gpus))


def main() -> None:
    import tempfile

    from tp2d_exp.perf import analysis
    from tp2d_exp.perf.planner import make_plan

    jobs = specs(Path(tempfile.mkdtemp()))
    overheads = []
    for spec, (_, _, _, reserved) in zip(jobs, PUBLISHED):
        allocated = analysis.predict_memory(spec.arch, analysis.StepShape.of(spec, 2)).allocated
        overheads.append(reserved * GiB / allocated - 1)
    overhead = sum(overheads) / len(overheads)

    def error(eff: float) -> float:
        return sum((make_plan(with_gpu(s, peak_bf16_tflops=PEAK_TFLOPS, gemm_efficiency=eff)).plan
                    .tokens_per_s_per_device / tps - 1) ** 2 for s, (_, _, tps, _) in zip(jobs, PUBLISHED))

    lo, hi = 0.05, 1.0
    for _ in range(60):  # golden-section search of a unimodal error
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, b) if error(a) < error(b) else (a, hi)
    eff = (lo + hi) / 2
    print(f"allocator_overhead: {overhead:.3f}  (per row: {', '.join(f'{o:.3f}' for o in overheads)})")
    print(f"h100_96gb peak_bf16_tflops: {PEAK_TFLOPS:g} (assumed, see above); gemm_efficiency: {eff:.3f} "
          f"(effective {PEAK_TFLOPS * eff:.0f} TFLOP/s)")


if __name__ == "__main__":
    main()
