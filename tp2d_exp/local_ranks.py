"""Run a function on N local gloo ranks (separate processes on 127.0.0.1, one CPU thread each), no Ray:
the harness of the parallel tests and the benchmarks, over the same torch.distributed code the workers run."""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


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
    except BaseException:  # noqa: BLE001 - the driver prints every rank's failure
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args: Any, timeout: float = 1800) -> list[Any]:
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
