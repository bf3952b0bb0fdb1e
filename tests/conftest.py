"""Shared fixtures: real multi-process gloo groups on 127.0.0.1, and jobs composed from the real Hydra config."""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # Plain pickle: tensors travel by value, not as shared memory that dies with this process.
        queue.put((rank, pickle.dumps(fn(*args)), None))
    except BaseException:  # noqa: BLE001 - report every rank's failure to the test
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Run fn(*args) on `world` gloo ranks (separate processes) and return each rank's result by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, value, error = queue.get(timeout=timeout)
            if error:
                raise AssertionError(f"rank {rank} failed:\n{error}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


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
