"""hydra/launcher=ray without a cluster: what it refuses and how it queues a sweep's jobs (the slow tier runs a
sweep through it on a 2-node loopback cluster: tests/test_multinode.py)."""

from __future__ import annotations

import subprocess
import sys

from omegaconf import OmegaConf

from hydra_plugins.tp2d_ray_launcher.ray_launcher import SweepJob, admits
from tests.conftest import ROOT


def test_without_a_cluster_address_the_sweep_stops_in_one_line_before_any_job(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=ray", "parallelism=tp2_dp1,tp1_dp2",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [error] = [line for line in proc.stderr.splitlines() if line.strip()]
    assert error.startswith("error: hydra/launcher=ray needs cluster.address=") and "basic launcher" in error
    assert not (tmp_path / "sweep").exists()


def test_a_job_is_admitted_only_when_its_workers_fit_besides_the_running_jobs():
    """4 CPUs, no GPU: two 2-CPU jobs run side by side, a third waits for one of them; a 4-CPU job waits for
    both; a job larger than the cluster runs alone (and fails in its own cluster check); a plan needs nothing."""
    def job(kind: str, need: float) -> SweepJob:
        return SweepJob(0, [], OmegaConf.create(), kind, need)

    total = {"CPU": 4.0}
    a, b = job("CPU", 2), job("CPU", 2)
    assert admits(a, [], total) and admits(b, [a], total)
    assert not admits(job("CPU", 2), [a, b], total) and admits(job("CPU", 2), [a], total)
    assert not admits(job("CPU", 4), [a], total) and admits(job("CPU", 4), [], total)
    assert admits(job("CPU", 8), [], total) and not admits(job("CPU", 8), [job("CPU", 0)], total)
    assert admits(job("CPU", 0), [a, b], total)
    assert not admits(job("GPU", 1), [a], total)  # a cluster without GPUs: the job fails alone, in one line
