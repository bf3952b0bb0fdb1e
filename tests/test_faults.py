"""Test-only fault injection fires once per job, so the worker group Ray restarts runs through."""

from __future__ import annotations

import json

import pytest

from tp2d_exp.config.schema import FaultMode
from tp2d_exp.train.faults import FAULT_MARKER, FaultInjector, InjectedFault


def test_injected_fault_fires_once_per_job(tmp_path):
    faults = FaultInjector(fail_at_step=3, rank=1, mode=FaultMode["raise"], nan_at_step=0, run_dir=str(tmp_path))
    faults.before_step(3, rank=0)  # another rank
    faults.before_step(2, rank=1)  # another step
    with pytest.raises(InjectedFault, match=r"injected fault at step 3 on rank 1 \(run.fault\)"):
        faults.before_step(3, rank=1)
    assert json.loads((tmp_path / FAULT_MARKER).read_text())["step"] == 3
    faults.before_step(3, rank=1)  # the restarted attempt (same run dir) runs through
