"""Attach to an existing Ray cluster vs start Ray locally: the same tp2_dp2 debug run both ways, side by side.

    python scripts/bench_attach.py            # CPU, 2 x 2-CPU loopback nodes vs one local Ray

Prints, per mode: Ray connect time, the cluster checks (resources; on several nodes the shared-path probe),
the time from those checks to the first worker line and to the first step, and the whole run.py wall time.
The attached cluster is started (and stopped) by this script, on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tp2d_exp.testing.ray_cluster import LoopbackCluster  # noqa: E402


def _stamp(line: str) -> float:
    return datetime.strptime(line[:23].strip("["), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run(env: dict, out: Path, *overrides: str) -> dict:
    attached = any(o.startswith("cluster.address=") for o in overrides)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "run.py", "parallelism=tp2_dp2", "run=debug", "logger=none",
                           f"hydra.run.dir={out}", f"cluster.storage_path={out / 'ray'}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    checked = next(line for line in (out / "run.log").read_text().splitlines() if "cluster checked" in line)
    launched = _stamp(checked)
    # "cluster checked after X s" counts from launch; a local start connects inside it, an attach before it.
    checks = float(checked.split("after ")[1].rstrip("s")) - (0 if attached else summary["ray_connect_s"])
    rank0 = (out / "logs" / "rank0.log").read_text().splitlines()
    started = next(_stamp(line) for line in rank0 if "worker 0/" in line)
    first = next(_stamp(line) for line in rank0 if "first step done" in line)
    return {"connect_s": summary["ray_connect_s"], "checks_s": checks, "to_workers_s": started - launched,
            "to_first_step_s": first - launched, "run_py_s": wall, "nodes": summary["placement"]["num_nodes"]}


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_attach"))
    env = dict(os.environ)
    results = {"local": run(env, tmp / "local")}
    t0 = time.time()
    with LoopbackCluster(cpus_per_node=[2, 2]) as cluster:
        cluster_start = time.time() - t0
        results["attached"] = run(cluster.env, tmp / "attached", f"cluster.address={cluster.address}")
    load = os.getloadavg()[0]
    print(f"(starting the 2-node loopback cluster itself took {cluster_start:.1f}s; load average {load:.1f})")
    keys = list(results["local"])
    print(f"{'':10}" + "".join(f"{k:>16}" for k in keys))
    for mode, r in results.items():
        print(f"{mode:10}" + "".join(f"{r[k]:>16.2f}" if isinstance(r[k], float) else f"{r[k]:>16}" for k in keys))
    a, b = results["attached"], results["local"]
    print(f"attached/local: connect {a['connect_s'] / b['connect_s']:.2f}x, "
          f"to first step {a['to_first_step_s'] / b['to_first_step_s']:.2f}x, "
          f"run.py {a['run_py_s'] / b['run_py_s']:.2f}x")


if __name__ == "__main__":
    main()
