"""Measure what one decoder layer's forward leaves for its backward: the check of
tp2d_exp.perf.analysis.layer_saved_bytes (tests/test_activations.py).

A plain saved_tensors_hooks around the layer would see only a checkpointed region's input (checkpointing
installs hooks of its own inside, and selective checkpointing keeps its tensors in its own cache), so this
counts liveness instead: a dispatch mode records the storage of every tensor any op of the forward
produces (a DTensor's local shard), and after the forward the ones still alive are what the autograd graph,
the checkpoint or its cache hold. Deduplicated by storage; parameters, the layer's output (the next layer's
input) and the tensors made before the layer (cos/sin, shared by every layer) are not counted; the layer's
input counts when the layer keeps it alive after the caller drops it.
"""

from __future__ import annotations

import gc
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from tp2d_exp.config.schema import ActivationCheckpointing
from tp2d_exp.config.spec import Architecture


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's data: a DTensor's local shard, the inner tensors of a wrapper
    subclass (functional collectives return one that waits on first use)."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    inner = (getattr(t, name) for name in names)
    return [p for x in inner if isinstance(x, torch.Tensor) for p in _plain(x)]


def _keys(t: torch.Tensor) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in _plain(t)}


class _Produced(TorchDispatchMode):
    """Weak references to the storage of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        # Every one: an address freed during the forward may come back for a later tensor.
        self.storages: list[tuple[StorageWeakRef, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            for plain in _plain(o) if isinstance(o, torch.Tensor) else ():
                storage = plain.untyped_storage()
                if storage.nbytes():
                    self.storages.append((StorageWeakRef(storage), storage.data_ptr(), storage.nbytes()))
        return out

    def alive(self) -> dict[int, int]:
        """Address -> bytes of the recorded storages still alive (alive ones have distinct addresses)."""
        return {ptr: n for ref, ptr, n in self.storages if not ref.expired()}


def build_layer(arch: Architecture, tp_mesh: Optional[Any], sequence_parallel: bool,
                ac: ActivationCheckpointing) -> tuple[nn.Module, nn.Module]:
    """One HF decoder layer of `arch` (random init, fp32, on CPU) with this project's TP styles and
    checkpointing, and the model's rotary embedding."""
    from transformers import AutoModelForCausalLM

    from tp2d_exp.train.materialize import hf_config
    from tp2d_exp.train.parallelize import checkpoint_layer, decoder_layer_styles

    config = hf_config(arch)
    config.num_hidden_layers = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = type(model.model.layers[0])(config, 0)
    rotary = type(model.model.rotary_emb)(config)
    if tp_mesh is not None and tp_mesh.size() > 1:
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(layer, tp_mesh, decoder_layer_styles(sequence_parallel))
    return checkpoint_layer(layer, ac), rotary


def measure_saved_bytes(layer: nn.Module, rotary: nn.Module, micro_batch: int, seq_length: int, hidden: int,
                        tp: int = 1, sequence_parallel: bool = False) -> int:
    """Bytes (this rank's local shards) one forward of `layer` leaves alive for backward. Under sequence
    parallel the layer's input is this rank's sequence shard, as between the model's layers."""
    rows = seq_length // tp if sequence_parallel and tp > 1 else seq_length
    positions = torch.arange(seq_length).expand(micro_batch, -1)
    cos, sin = rotary(torch.zeros(micro_batch, seq_length, hidden), positions)
    before = set().union(*(_keys(t) for t in (cos, sin, *layer.parameters())))
    x = torch.randn(micro_batch, rows, hidden, requires_grad=True)
    watch_input = StorageWeakRef(x.untyped_storage())
    input_ptr, input_bytes = x.untyped_storage().data_ptr(), x.untyped_storage().nbytes()
    with _Produced() as produced:
        out = layer(x, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
    out = out[0] if isinstance(out, tuple) else out
    skip = before | _keys(out) | {input_ptr}  # the input is counted below (views of it are op outputs)
    del x  # alive after this only if the layer's graph holds it
    gc.collect()  # a tensor held only by a reference cycle (a frame of the forward) is not saved for backward
    saved = sum(n for ptr, n in produced.alive().items() if ptr not in skip)
    return saved + (0 if watch_input.expired() else input_bytes)
