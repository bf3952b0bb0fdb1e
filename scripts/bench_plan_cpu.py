"""Predicted against measured peak memory per rank of CPU runs through run.py (Ray workers, gloo, fp32):

    python scripts/bench_plan_cpu.py                       # tiny (tp2_dp2) and the Qwen2.5-0.5B architecture
    python scripts/bench_plan_cpu.py --cases tiny_none     # one case

Each case is one run.py job (one at a time: a 0.5B rank holds GBs), a few steps, W&B off; its summary.json
holds the measured peak RSS of every rank (memory.peak_bytes_per_rank) and the plan's prediction
(memory.predicted.total: the process baseline, the model states, the peak phase's tensors and glibc's heap
overhead, tp2d_exp.perf.analysis). Prints one line per case: measured max / predicted and their ratio.
The 0.5B cases run on tp1_dp1: its states alone are 7.9 GB in fp32, so four ranks of tp2_dp2 need ~21 GB,
more than this 24 GB machine holds beside Ray and anything else it runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
QWEN = ["model=qwen2_5_0_5b", "model.pretrained=false", "model.name_or_path=null", "parallelism=tp1_dp1", "data.seq_length=256",
        "run.batch_size_per_gpu=1"]
CASES = {
    "tiny_none": ["run.activation_checkpointing=none"],
    "tiny_full": ["run.activation_checkpointing=full"],
    "qwen0.5b_none": [*QWEN, "run.activation_checkpointing=none"],
    "qwen0.5b_full": [*QWEN, "run.activation_checkpointing=full"],
}


def run_case(name: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "run.py", "run.max_steps=3", "run.eval_every=0", "logger=none", "run.profile_steps=0",
           *overrides, f"hydra.run.dir={run_dir}", f"cluster.storage_path={out / 'ray'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())["memory"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench_plan_cpu_"))
    print(f"{'case':<16} {'measured max GiB':>17} {'per rank':>24} {'predicted GiB':>14} {'ratio':>6}  peak phase")
    for name in args.cases:
        memory = run_case(name, CASES[name], out)
        measured, predicted = memory["peak_bytes"], memory["predicted"]["total"]
        ranks = ", ".join(f"{b / GiB:.2f}" for b in memory["peak_bytes_per_rank"])
        print(f"{name:<16} {measured / GiB:>17.3f} {ranks:>24} {predicted / GiB:>14.3f} {measured / predicted:>6.2f}  "
              f"{memory['predicted']['peak_phase']}", flush=True)


if __name__ == "__main__":
    main()
