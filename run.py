"""Train a Hugging Face causal LM with 2D (TP x FSDP2) parallelism on Ray Train.

    python run.py                                   # offline CPU default: tiny Qwen2, tp2_dp2
    python run.py parallelism=tp4_dp2 model=qwen2_7b
    python run.py -m parallelism=tp1_dp4,tp2_dp2,tp4_dp1

Compose (Hydra) -> validate and prepare (no worker yet) -> launch (Ray TorchTrainer) -> objective;
tp2d_exp.driver.job runs it.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from tp2d_exp.config.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from tp2d_exp.driver.job import hydra_context, run_job

    return run_job(cfg, hydra_context())


if __name__ == "__main__":
    main()
