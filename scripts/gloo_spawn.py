"""Benchmarks run their ranks as plain gloo processes on 127.0.0.1 (no Ray), one CPU thread each: the ranks
share the machine's cores, and Ray adds nothing per step once workers run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tp2d_exp.local_ranks import run_distributed as spawn  # noqa: E402,F401 - the benchmarks' name for it


def compose(overrides: list[str], prepare_job: bool = True) -> dict[str, Any]:
    """The job dict run.py would build for these overrides; prepared (validated, tokenizer, token cache)
    unless `prepare_job` is false (enough for building a model from its architecture keys)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from tp2d_exp.config import job_dict, register_configs
    from tp2d_exp.launch import prepare

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    job = job_dict(cfg, root=ROOT, output_dir=ROOT / "outputs" / "bench")
    return prepare(job) if prepare_job else job
