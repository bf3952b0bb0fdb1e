"""Run a function on N local gloo ranks (separate processes on 127.0.0.1, one CPU thread each), no Ray:
the harness of the parallel tests and the benchmarks, over the same torch.distributed code the workers run.

`RankPool` keeps N initialised ranks for many calls, forked by default from a forkserver that imported
torch, transformers' decoder models and the training code once: a spawned rank pays ~4 s of CPU for those
imports, which on 2 cores made starting 4 + 2 + 1 ranks cost 27 s instead of 10 s (measured, first call a
tiny model's setup and step). Forked ranks hold no state of the parent or of earlier ranks, but touching
the preloaded modules copies shared pages (~4 MB of RSS per rank). `run_distributed` is a pool for one call
of spawned interpreters: nothing left over from earlier work, and memory measured from a clean process."""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import traceback
from typing import Any, Callable

# What every rank imports: loaded once by the forkserver, shared copy-on-write by the ranks it forks.
PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.models.qwen2.modeling_qwen2",
           "transformers.models.llama.modeling_llama", "tp2d_exp.train.loop"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1: bound together while chosen, so none repeats (one at a time,
    the kernel may hand the same port out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _serve(rank: int, world: int, port: int, inbox, outbox) -> None:
    """A rank: initialise once, then run (fn, args) messages until None."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while (message := inbox.get()) is not None:
        fn, args = message
        try:
            # Plain pickle: tensors travel by value, not as shared memory that dies with this process.
            outbox.put((rank, pickle.dumps(fn(*args)), None))
        except BaseException:  # noqa: BLE001 - the driver prints the failure and retires the pool
            outbox.put((rank, None, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """`world` gloo ranks that stay up between calls. A call that fails on any rank retires the pool (the
    other ranks may be stuck in a collective); the next `run` then needs a new pool."""

    def __init__(self, world: int, start_method: str = "forkserver"):
        import torch.multiprocessing as mp  # here, so that importing this module (free_port) stays light

        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)  # no effect once this process's forkserver runs
        self.world = world
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world, port, self.inboxes[r], self.outbox), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self.alive = True

    def run(self, fn: Callable, *args: Any, timeout: float = 1800) -> list[Any]:
        """fn(*args) on every rank; each rank's return value, by rank."""
        if not self.alive:
            raise RuntimeError("this RankPool was retired by an earlier failure")
        for inbox in self.inboxes:
            inbox.put((fn, args))
        results: dict[int, Any] = {}
        try:
            for _ in range(self.world):
                rank, value, error = self.outbox.get(timeout=timeout)
                if error:
                    raise RuntimeError(f"rank {rank} failed:\n{error}")
                results[rank] = pickle.loads(value)
        except (RuntimeError, queue_mod.Empty):
            self.close(graceful=False)
            raise
        return [results[r] for r in range(self.world)]

    def close(self, graceful: bool = True) -> None:
        """Stop the ranks: let them leave the process group, or (after a failure) kill them at once."""
        if self.alive and graceful:
            for inbox in self.inboxes:
                inbox.put(None)
        self.alive = False
        for p in self.procs:
            p.join(timeout=30 if graceful else 0)
            if p.is_alive():
                p.kill()
                p.join()


def run_distributed(fn: Callable, world: int, *args: Any, timeout: float = 1800) -> list[Any]:
    """fn(*args) on `world` freshly spawned gloo ranks, which end with the call; each rank's return value."""
    pool = RankPool(world, start_method="spawn")
    try:
        return pool.run(fn, *args, timeout=timeout)
    finally:
        pool.close()
