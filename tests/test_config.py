"""Config composition: architecture facts, run names and W&B grouping, as workers receive them."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT
from tp2d_exp.config import architecture


def test_local_model_dir_config_overrides_the_preset_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 512}))
    arch = architecture({"name_or_path": str(tmp_path), "family": "qwen2", "num_key_value_heads": 9,
                         "hidden_size": 1})
    assert arch["family"] == "llama" and arch["hidden_size"] == 64
    assert arch["num_key_value_heads"] == 4  # absent in config.json: multi-head attention


def test_jobs_get_unique_run_names_and_sweeps_share_a_wandb_group(job_factory, tmp_path):
    from hydra import compose, initialize_config_dir

    from tp2d_exp.config import job_dict, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger.mode=offline"])
    single = job_dict(cfg, root=ROOT, output_dir=ROOT / "outputs" / "runs" / "2026-01-01" / "10-00-00")
    assert single["run_name"] == "runs_2026-01-01_10-00-00" and single["logger"]["group"] == single["run_name"]
    sweep_dir = ROOT / "outputs" / "multirun" / "2026-01-01" / "10-00-00"
    jobs = [job_dict(cfg, root=ROOT, output_dir=sweep_dir / str(n), job_num=n, sweep_dir=sweep_dir) for n in (0, 1)]
    assert jobs[0]["run_name"] != jobs[1]["run_name"]
    assert jobs[0]["logger"]["group"] == jobs[1]["logger"]["group"] == "sweep-2026-01-01_10-00-00"
    assert "tp2_dp2" in jobs[0]["logger"]["tags"]


def test_asking_for_more_gpus_than_the_cluster_has_fails_fast(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "logger=none", "cluster.device=cuda", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: cluster.device=cuda but the Ray cluster has no GPUs; use cluster.device=auto or cpu" in proc.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
