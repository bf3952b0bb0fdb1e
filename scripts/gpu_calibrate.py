"""On a machine with GPUs: a few short real steps per mesh through run.py, printed against the plan of the same
job (run.plan_only's model on this machine's GPU row): step time, peak reserved memory and MFU.

    python scripts/gpu_calibrate.py                                   # qwen2_5_0_5b, every mesh of the GPUs here
    python scripts/gpu_calibrate.py --meshes tp1_dp8 tp2_dp4 -- model=llama3_8b data.seq_length=8192 \\
        run.batch_size_per_gpu=2 run.activation_checkpointing=selective

Without CUDA it stops at once (exit 2). The GPU is matched to conf/hardware/gpus.yaml by name (a GPU not in
the table stops too: add its row). The plan uses the profile given with `hardware=` (default h100_nvlink_ib)
for the links; its constants were fitted on torchtitan's published runs (README "Mesh sweeps"), so a
systematic gap here is the number to fit this machine's gemm_efficiency and allocator_overhead on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
DEFAULT = ["model=qwen2_5_0_5b", "model.pretrained=false", "data.seq_length=2048", "run.batch_size_per_gpu=2"]


def meshes_for(gpus: int) -> list[str]:
    return [f"tp{tp}_dp{gpus // tp}" for tp in (1, 2, 4, 8) if tp <= gpus and gpus % tp == 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", nargs="*", help="tp{T}_dp{D} (default: every tp dividing the GPUs here)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="run.py overrides (default: the 0.5B architecture, seq 2048)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is false); run this on a GPU machine",
              file=sys.stderr)
        raise SystemExit(2)
    from tp2d_exp.config.schema import compose
    from tp2d_exp.perf.planner import make_plan
    from tp2d_exp.testing.jobs import compose_job

    name, gpus = torch.cuda.get_device_name(0), torch.cuda.device_count()
    table = compose(["logger=none"]).hardware.gpus
    row = next((key for key, g in sorted(table.items(), key=lambda kv: -len(kv[1].match))
                if all(m in name for m in g.match)), None)
    if row is None:
        print(f"error: {name} is not in conf/hardware/gpus.yaml; add its row", file=sys.stderr)
        raise SystemExit(2)
    overrides = args.overrides or DEFAULT
    out = Path(tempfile.mkdtemp(prefix="gpu_calibrate_"))
    print(f"{gpus} x {name} (row {row}); {' '.join(overrides)}")
    print(f"{'mesh':<10} {'step s meas/pred':>18} {'reserved GiB meas/pred':>24} {'MFU meas/pred':>16}")
    for mesh in args.meshes or meshes_for(gpus):
        job = [*overrides, f"parallelism={mesh}", f"hardware.gpu={row}", "logger=none"]
        plan = make_plan(compose_job(out / f"{mesh}_plan", job, prepare=False))
        run_dir = out / mesh
        proc = subprocess.run([sys.executable, "run.py", *job, "cluster.device=cuda", f"run.max_steps={args.steps}",
                               "run.eval_every=0", "run.log_interval=1", f"hydra.run.dir={run_dir}",
                               f"cluster.storage_path={out / 'ray'}"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            print(f"{mesh:<10} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        s = json.loads((run_dir / "summary.json").read_text())
        reserved = s["memory"].get("peak_reserved_bytes", 0)
        print(f"{mesh:<10} {s['step_time_s']:>8.3f} / {plan.plan.step_time_s:<8.3f} "
              f"{reserved / GiB:>11.2f} / {plan.memory.predicted.total / GiB:<10.2f} "
              f"{s.get('mfu') or 0:>7.1%} / {plan.plan.mfu:<7.1%}", flush=True)


if __name__ == "__main__":
    main()
