"""Checkpoint writes that overlap training: DCP's async_save, then this rank's checksums, in the background.

The write's collectives run in a background thread, so they get a gloo group of their own: sharing the
default group with the training loop's collectives would interleave the two streams of calls. DCP first
stages the state dict into CPU memory (the only part that blocks training; the copy costs host RAM the size
of this rank's model + optimizer shard) and then writes from that copy while the next steps train.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from tp2d_exp.checkpoint.store import storage_writer


class AsyncWriter:
    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")  # collective: every rank creates it at the same point
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")

    def save(self, state: dict[str, Any], path: str, then: Callable[[], Any]) -> Future:
        """Stage `state` and start writing it to `path`; the future resolves to `then()`, run once the
        write is complete on every rank (DCP's finish step, .metadata included, ends the write collectively)."""
        written = dcp.async_save(state, storage_writer=storage_writer(path), process_group=self.group)
        return self.executor.submit(lambda: (written.result(), then())[1])

    def close(self) -> None:
        self.executor.shutdown(wait=True)
