"""Train a Hugging Face causal LM with 2D (TP x FSDP2) parallelism on Ray Train.

    python run.py                                   # offline CPU default: tiny Qwen2, tp2_dp2
    python run.py parallelism=tp4_dp2 model=qwen2_7b
    python run.py -m parallelism=tp1_dp4,tp2_dp2,tp4_dp1

Compose (Hydra) -> validate and prepare (no worker yet) -> launch (Ray TorchTrainer) -> objective.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tp2d_exp.config import ConfigError, job_dict, register_configs

log = logging.getLogger("tp2d_exp")
register_configs()


def job_config(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return job_dict(cfg, root=Path(hc.runtime.cwd), output_dir=Path(hc.runtime.output_dir),
                    job_num=hc.job.num if multirun else None, sweep_dir=Path(hc.sweep.dir) if multirun else None)


def _fail(cfg: dict, message: str, code: int) -> float:
    summary = Path(cfg["output_dir"]) / "summary.json"
    if not summary.exists():  # failed before launch wrote one
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps({"status": "failed", "error": message, "run_name": cfg["run_name"],
                                       "mesh": {k: cfg["parallelism"][k] for k in ("tp", "dp")}}, indent=2))
    print(f"error: {message}", file=sys.stderr)
    if cfg["multirun"]:
        return math.inf  # the sweep goes on; this job is recorded as failed
    raise SystemExit(code)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from tp2d_exp.launch import launch, prepare

    job = job_config(cfg)
    try:
        if job["run"]["plan_only"]:
            from tp2d_exp.plan import plan

            return plan(job)
        job = prepare(job)
        summary = launch(job)
    except ConfigError as e:
        return _fail(job, str(e), 2)
    if summary["status"] != "completed":
        return _fail(job, summary.get("error", "training failed"), 1)
    if "final_loss" not in summary:  # resumed a run that had already finished
        print(f"nothing to train: run {job['run_name']} is already at step {summary.get('resumed_from_step')}")
        return math.nan
    print(f"done: {summary['steps']} steps, loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, "
          f"{summary['tokens_per_s']:.0f} tokens/s on tp{job['parallelism']['tp']}_dp{job['parallelism']['dp']}"
          f" in {summary['wall_time_s']:.0f}s; outputs in {job['output_dir']}")
    return summary["final_loss"]


if __name__ == "__main__":
    main()
