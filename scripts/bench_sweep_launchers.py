"""The same 2-job sweep through Hydra's basic launcher (one job at a time) and through hydra/launcher=ray (jobs
side by side on the attached cluster), on the same cluster, side by side.

    python scripts/bench_sweep_launchers.py                      # starts a 2 x 2-CPU loopback cluster
    python scripts/bench_sweep_launchers.py --address HOST:PORT  # an existing cluster (token in the environment)

Prints, per launcher: the sweep's wall time (run.py -m, start to exit), each job's own wall_time_s
(summary.json: its launch to its end) and their sum, and the ratios. On a 2-core machine the two jobs' workers
share the cores, so only their start-ups (Ray Train starting workers, data, W&B) overlap; on a real cluster each
job has its own devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tp2d_exp.testing.ray_cluster import LoopbackCluster  # noqa: E402

JOBS = "parallelism=tp2_dp1,tp1_dp2"


def sweep(env: dict, address: str, out: Path, *launcher: str) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "run.py", "-m", JOBS, "logger=none", f"cluster.address={address}",
                           f"hydra.sweep.dir={out}", f"cluster.storage_path={out / 'ray'}", *launcher],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    jobs = [json.loads((out / str(n) / "summary.json").read_text()) for n in range(2)]
    bad = [j for j in jobs if j["status"] != "completed"]
    if bad:
        raise SystemExit(f"a job failed: {bad[0].get('error')}")
    return {"sweep_s": wall, "jobs_s": [j["wall_time_s"] for j in jobs], "meshes": [j["mesh"] for j in jobs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="attach to this cluster instead of starting a 2-node loopback one")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep"))
    with nullcontext() if args.address else LoopbackCluster(cpus_per_node=[2, 2]) as cluster:
        address, env = (args.address, dict(os.environ)) if args.address else (cluster.address, cluster.env)
        results = {"basic": sweep(env, address, tmp / "basic"),
                   "ray": sweep(env, address, tmp / "ray", "hydra/launcher=ray")}
    print(f"2-job sweep ({JOBS}, 40 steps each) on {address}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'launcher':10}{'sweep s':>10}{'job 0 s':>10}{'job 1 s':>10}{'sum jobs s':>12}{'sweep/sum':>11}")
    for name, r in results.items():
        total = sum(r["jobs_s"])
        print(f"{name:10}{r['sweep_s']:>10.1f}" + "".join(f"{s:>10.1f}" for s in r["jobs_s"])
              + f"{total:>12.1f}{r['sweep_s'] / total:>11.2f}")
    print(f"ray/basic sweep wall time: {results['ray']['sweep_s'] / results['basic']['sweep_s']:.2f}")


if __name__ == "__main__":
    main()
