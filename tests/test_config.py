"""Config composition: the typed job spec, architecture facts, run names and W&B grouping, as workers
receive them."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from tests.conftest import ROOT, compose, compose_job
from tp2d_exp.config.schema import ModelConfig
from tp2d_exp.config.spec import Architecture, JobContext, JobSpec, build_spec


def test_local_model_dir_config_overrides_the_preset_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 512}))
    arch = Architecture.of(ModelConfig(name="local", name_or_path=str(tmp_path), num_key_value_heads=9,
                                       hidden_size=1))
    assert arch.family == "llama" and arch.hidden_size == 64
    assert arch.num_key_value_heads == 4  # absent in config.json: multi-head attention


def test_a_local_model_of_a_family_without_tp_plan_is_refused_in_one_line(tmp_path):
    from tp2d_exp.config.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 64}))
    with pytest.raises(ConfigError, match=r"is a 'gpt2' model \(config.json model_type\), a family without TP "
                                          r"styles here; supported: qwen2, llama, mistral"):
        Architecture.of(ModelConfig(name="local", name_or_path=str(tmp_path)))


def test_jobs_get_unique_run_names_and_sweeps_share_a_wandb_group():
    cfg = compose(["logger=wandb", "logger.mode=offline"])
    single = build_spec(cfg, JobContext(ROOT, ROOT / "outputs" / "runs" / "2026-01-01" / "10-00-00"))
    assert single.resolved.run_name == "runs_2026-01-01_10-00-00"
    assert single.resolved.wandb.group == single.resolved.run_name
    sweep_dir = ROOT / "outputs" / "multirun" / "2026-01-01" / "10-00-00"
    jobs = [build_spec(cfg, JobContext(ROOT, sweep_dir / str(n), job_num=n, sweep_dir=sweep_dir)) for n in (0, 1)]
    assert jobs[0].resolved.run_name != jobs[1].resolved.run_name
    assert jobs[0].resolved.wandb.group == jobs[1].resolved.wandb.group == "sweep-2026-01-01_10-00-00"
    assert "tp2_dp2" in jobs[0].resolved.wandb.tags


def test_the_spec_is_frozen_typed_and_holds_the_effective_values(tmp_path):
    """What a worker receives: the frozen JobSpec (pickled, as Ray ships train_loop_config), read by
    attribute; the user's section keeps what was asked, `resolved` what it became."""
    spec = compose_job(tmp_path, ["run.global_batch_size=0", "run.batch_size_per_gpu=3"])
    shipped = pickle.loads(pickle.dumps(spec))
    assert isinstance(shipped, JobSpec) and shipped == spec
    assert spec.run.global_batch_size == 0 and spec.resolved.global_batch_size == 3 * spec.dims.dp
    gbs = 3 * spec.dims.dp  # the schedule in samples: max_steps of this batch, or the epoch's whole batches
    assert spec.resolved.schedule.end_samples == gbs * min(spec.run.max_steps, spec.resolved.num_samples // gbs)
    assert spec.resolved.storage_path == str(ROOT / "outputs" / "ray") and spec.cluster.storage_path is None
    for frozen in (spec, spec.run, spec.run.fault, spec.dims, spec.resolved, spec.arch):
        with pytest.raises(dataclasses.FrozenInstanceError):
            frozen.seed = 1  # any attribute: frozen dataclasses refuse every assignment


def test_every_worker_gets_the_frozen_spec_as_its_train_loop_config(tmp_path):
    """The TorchTrainer the launcher builds hands the JobSpec itself to the workers (in the dict Ray Train
    expects, under "spec", next to the handoff of the credentials), and Ray's serializer ships it whole."""
    import ray.cloudpickle

    from tp2d_exp.config.validate import Capacity
    from tp2d_exp.credentials import Handoff
    from tp2d_exp.driver.launch import make_trainer
    from tp2d_exp.train.worker import train_worker

    spec = compose_job(tmp_path, [])
    trainer = make_trainer(spec, Capacity(use_gpu=False, kind="CPU", per_worker=1.0, total=4, free=4,
                                          workers_per_node={"n": 4}), Handoff())
    assert trainer.train_loop_per_worker is train_worker
    assert trainer.train_loop_config == {"spec": spec, "credentials": Handoff()}
    assert trainer.train_loop_config["spec"] is spec
    shipped = ray.cloudpickle.loads(ray.cloudpickle.dumps(trainer.train_loop_config))["spec"]
    assert type(shipped) is JobSpec and shipped == spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        shipped.resolved.num_samples = 0
