"""Shared fixtures: real multi-process gloo groups on 127.0.0.1, and jobs composed from the real Hydra config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tp2d_exp.local_ranks import RankPool

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

_pools: dict[int, RankPool] = {}


def run_distributed(fn, world: int, *args: Any, timeout: float = 1800) -> list[Any]:
    """fn(*args) on `world` gloo ranks, by rank. The ranks are kept for the whole session (one pool per
    world size), so each parallel test pays for its own work, not for starting processes; a failed call
    retires its pool and the next one starts afresh. Functions must not leave state that changes later
    calls (the tests that measure a process's own memory use tp2d_exp.local_ranks.run_distributed)."""
    pool = _pools.get(world)
    if pool is None or not pool.alive:
        pool = _pools[world] = RankPool(world)
    return pool.run(fn, *args, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools():
    yield
    for pool in _pools.values():
        pool.close()


def compose_job(tmp_path: Path, overrides: list[str], prepare: bool = True) -> dict[str, Any]:
    """A job dict exactly as run.py builds it, from the real conf/ and these overrides. The tokenizer and
    token caches are shared across tests (outputs/cache of the project) since they are deterministic."""
    from hydra import compose, initialize_config_dir

    from tp2d_exp.config import job_dict, register_configs
    from tp2d_exp.launch import prepare as prepare_job

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", *overrides])
    job = job_dict(cfg, root=ROOT, output_dir=tmp_path / "run")
    return prepare_job(job) if prepare else job


@pytest.fixture
def job_factory(tmp_path: Path):
    return lambda overrides, **kw: compose_job(tmp_path, overrides, **kw)
