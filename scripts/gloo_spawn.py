"""Benchmarks run their ranks as plain gloo processes on 127.0.0.1 (no Ray), one CPU thread each: the ranks
share the machine's cores, and Ray adds nothing per step once workers run."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, pickle.dumps(fn(*args)), None))
    except BaseException:  # noqa: BLE001 - the driver prints every rank's failure
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any, timeout: float = 1800) -> list[Any]:
    """fn(*args) on `world` gloo ranks; each rank's return value, by rank."""
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
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


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
