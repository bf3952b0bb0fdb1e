"""What a run asks of the user's environment, checked without a cluster (the slow tier runs the real thing:
tests/test_multinode.py): credentials stay out of everything Ray writes down, and a loopback cluster address
needs no Ray variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, compose_job


def test_credentials_are_in_neither_the_runtime_env_nor_what_ray_train_records(tmp_path, monkeypatch):
    """Ray logs the workers' runtime env, and Ray Train V2 keeps the text of train_loop_config (str() of each
    value) in its run state: neither holds a credential, nor the key it waits under on an attached cluster.
    A local Ray gets no handoff at all (its workers inherit the driver's environment)."""
    from ray.train.v2._internal.state.schema import _to_json_serializable_value

    from tp2d_exp.config.validate import Capacity
    from tp2d_exp.credentials import SECRET_ENV, Handoff, hand_off
    from tp2d_exp.driver.launch import make_trainer

    for name in SECRET_ENV:
        monkeypatch.setenv(name, f"marker-{name}")
    with hand_off(attached=False) as local:
        assert local == Handoff()
    handoff = Handoff(SECRET_ENV, key="credentials/one-time-key")
    trainer = make_trainer(compose_job(tmp_path, [], prepare=False), Capacity(
        use_gpu=False, kind="CPU", per_worker=1.0, total=4, free=4, workers_per_node={"n": 4}), handoff)
    recorded = json.dumps([_to_json_serializable_value(trainer.train_loop_config),
                           trainer.run_config.worker_runtime_env])
    assert "marker-" not in recorded and "one-time-key" not in recorded
    assert "HF_TOKEN" in recorded  # the names are no secret


def test_a_loopback_cluster_address_stays_on_loopback_without_any_variable():
    """Ray, imported without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, turns 127.0.0.1 into this machine's network
    IP, where a loopback head does not listen; once the launcher has seen a loopback address, it does not."""
    code = ("import ray; from ray._private.services import canonicalize_bootstrap_address as resolve; "
            "from tp2d_exp.driver import cluster; before = resolve('127.0.0.1:6379'); cluster._stay_on_loopback(); "
            "print(before, resolve('127.0.0.1:6379'))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    before, after = proc.stdout.split()
    assert after == "127.0.0.1:6379"
    print(f"Ray's own resolution: {before}")
