"""Validation, in the order a job meets it; every stage runs on the driver before any worker starts, and
each rule lives in exactly one stage. A failure is a ConfigError whose message is one line naming the key
and the fix.

1. compose (Hydra + tp2d_exp.config.schema): unknown keys, wrong types, unknown enum values;
   ParallelDims (tp, dp >= 1) and Architecture.of (a local config.json of an unsupported family) when the
   spec is built.
2. config (`check_config`): values against each other, the model's architecture, local paths, the
   environment. No network, no torch: about a second.
3. data (`check_tokenizer`, `check_corpus`): what the tokenizer and the tokenized corpus turn out to be
   (tp2d_exp.driver.prepare loads them; a checkpoint to start from is checked there too:
   tp2d_exp.checkpoint.manager.find_start, and the settings a same-name rerun must keep).
4. cluster (`check_cluster`): what the Ray cluster holds, once connected (tp2d_exp.driver.cluster).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

from tp2d_exp.config.errors import ConfigError, ResourceError
from tp2d_exp.config.schema import DataSource, Device
from tp2d_exp.config.spec import JobSpec

ADDRESS = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_config(spec: JobSpec) -> None:
    """Stage 2: raise ConfigError for the first value that cannot work."""
    dims, arch, m, d, r, c = spec.dims, spec.arch, spec.model, spec.data, spec.run, spec.cluster
    dims.check_model(arch, d.seq_length)
    if m.name_or_path and m.name_or_path.startswith((".", "/", "~")):
        _require(os.path.isdir(os.path.expanduser(m.name_or_path)),
                 f"model.name_or_path={m.name_or_path!r} is not a directory; "
                 "give a local HF model dir or a hub id like Qwen/Qwen2.5-0.5B")
    _require(not m.pretrained or bool(m.name_or_path),
             "model.pretrained=true needs model.name_or_path (a hub id or local dir); or set model.pretrained=false")

    _require(d.seq_length >= 2, f"data.seq_length={d.seq_length} must be at least 2")
    _require(d.seq_length <= arch.max_position_embeddings,
             f"data.seq_length={d.seq_length} exceeds model.max_position_embeddings="
             f"{arch.max_position_embeddings}; lower data.seq_length")
    _require(0 < d.dataset_percentage <= 100, f"data.dataset_percentage={d.dataset_percentage} must be in (0, 100]")
    _require(d.packing or not d.attention_within_documents,
             "data.attention_within_documents=true needs data.packing=true (a padded sample holds one document); "
             "set one of them")
    if d.source is DataSource.text_files:
        _require(bool(d.path), "data.path is not set; give a file, dir or glob of .txt/.jsonl/.parquet files")
        _require(bool(spec.resolved.data_files),
                 f"data.path={d.path!r} matches no .txt/.jsonl/.json/.parquet file; check the path")
    if d.source is DataSource.hf:
        _require(bool(d.hf_name), "data.hf_name is not set; name a Hugging Face dataset, e.g. wikitext")

    _require(r.batch_size_per_gpu >= 1, f"run.batch_size_per_gpu={r.batch_size_per_gpu} must be positive")
    _require(r.learning_rate > 0, f"run.learning_rate={r.learning_rate} must be positive")
    _require(r.max_steps >= 0, f"run.max_steps={r.max_steps} must be >= 0 (0 = no limit)")
    _require(r.num_epochs >= 1, f"run.num_epochs={r.num_epochs} must be positive")
    _require(r.log_interval >= 1, f"run.log_interval={r.log_interval} must be positive")
    _require(r.weight_decay >= 0, f"run.weight_decay={r.weight_decay} must be >= 0")
    _require(r.checkpoint_every >= 0, f"run.checkpoint_every={r.checkpoint_every} must be >= 0 (0 = at the end)")
    _require(r.num_to_keep >= 1, f"run.num_to_keep={r.num_to_keep} must be at least 1")
    _require(r.max_failures >= -1, f"run.max_failures={r.max_failures} must be >= 0 (-1 = no limit)")
    _require(0 <= r.fault.rank < dims.world_size,
             f"run.fault.rank={r.fault.rank} is not a worker rank; use 0..{dims.world_size - 1}")
    _require(r.measure_step >= 0 and r.profile_steps >= 0,
             f"run.measure_step={r.measure_step} and run.profile_steps={r.profile_steps} must be >= 0 (0 = off)")
    if r.global_batch_size:
        micro = r.batch_size_per_gpu * dims.dp
        _require(r.global_batch_size % micro == 0,
                 f"run.global_batch_size={r.global_batch_size} is not a multiple of run.batch_size_per_gpu*dp="
                 f"{micro}; change one of them")

    if not r.plan_only:  # a plan never touches the cluster
        _check_address(c.address)
        _require(c.resource_wait_s > 0, f"cluster.resource_wait_s={c.resource_wait_s} must be positive")
    hw = spec.hardware
    _require(hw.gpu in hw.gpus, f"hardware.gpu={hw.gpu!r} is not in the GPU table; "
             f"use one of {', '.join(hw.gpus)} or add a row to conf/hardware/gpus.yaml")


def _check_address(address: str | None) -> None:
    if address is None or address == "auto":
        return
    _require(bool(ADDRESS.match(address)),
             f"cluster.address={address!r} is not an address; use null (local Ray), auto (the cluster started on "
             "this machine), host:port (a head's GCS) or ray://host:port")
    _require(not address.startswith("ray://") or importlib.util.find_spec("grpc") is not None,
             f"cluster.address={address} uses Ray Client, which needs `pip install 'ray[client]'`; "
             "or run on the head node with cluster.address=auto")


def check_tokenizer(spec: JobSpec, vocab: int) -> None:
    """Stage 3: the tokenizer's vocabulary against the model's."""
    _require(vocab <= spec.arch.vocab_size, f"model.vocab_size={spec.arch.vocab_size} is smaller than the "
             f"tokenizer's {vocab} tokens; set model.vocab_size>={vocab}")


def check_corpus(spec: JobSpec, num_samples: int) -> None:
    """Stage 3: the tokenized corpus's sample count against the global batch."""
    seq, gbs = spec.data.seq_length, spec.resolved.global_batch_size
    _require(num_samples > 0, f"the corpus yields no sample of data.seq_length={seq}; "
             "check data.path/data.source or lower data.seq_length")
    _require(num_samples >= gbs, f"the corpus has {num_samples} samples of data.seq_length={seq}, fewer than one "
             f"global batch ({gbs}); lower run.batch_size_per_gpu or add data")


@dataclass(frozen=True)
class Capacity:
    """What the cluster holds for this job's workers."""

    use_gpu: bool
    kind: str  # the resource a worker reserves: GPU, or CPU on a CPU-only run
    per_worker: float
    total: float  # of `kind`, over the alive nodes
    free: float  # not held by other jobs right now
    workers_per_node: dict[str, int]  # node id -> workers it can hold

    @property
    def max_per_node(self) -> int:
        return max(self.workers_per_node.values(), default=0)


def check_cluster(spec: JobSpec, nodes: dict[str, dict[str, float]], free: dict[str, float]) -> Capacity:
    """Stage 4: decide CPU or GPU from the alive nodes' resources (node id -> {"CPU": n, "GPU": n}) and fail
    fast when no layout of tp*dp workers over them exists (Ray Train V2 would retry such a placement forever)."""
    c, world = spec.cluster, spec.dims.world_size
    gpus = sum(res.get("GPU", 0) for res in nodes.values())
    if c.device is Device.cuda and gpus == 0:
        raise ResourceError("cluster.device=cuda but the Ray cluster has no GPUs; use cluster.device=auto or cpu, "
                            "or attach to a GPU cluster (cluster.address)")
    use_gpu = c.device is Device.cuda or (c.device is Device.auto and gpus > 0)
    if spec.run.compile and not use_gpu:  # known here only: cluster.device=auto is CUDA when the cluster has GPUs
        cpu = "cluster.device=cpu" if c.device is Device.cpu else "the Ray cluster has no GPU"
        raise ResourceError(f"run.compile=true needs CUDA (the CPU runs use eager mode) but {cpu}; set "
                            "run.compile=false" + (" or cluster.device=auto" if c.device is Device.cpu else ""))
    # What Ray Train reserves per worker (ScalingConfig): 1 GPU, or cluster.cpus_per_worker CPUs.
    kind, each = ("GPU", 1.0) if use_gpu else ("CPU", float(c.cpus_per_worker))
    have = {node: res.get(kind, 0) for node, res in nodes.items()}
    fits = {node: int(amount // each) for node, amount in have.items()}
    total = sum(have.values())
    inventory = (f"{total:g} {kind}s on {len(nodes)} node{'s' * (len(nodes) != 1)} "
                 f"({'+'.join(f'{v:g}' for v in have.values())})")
    asked = f"parallelism: tp*dp={world} workers of {each:g} {kind} each"
    if world * each > total:
        fix = ("lower parallelism.tp/parallelism.dp or add GPU nodes" if use_gpu else
               "lower parallelism.tp/parallelism.dp or cluster.cpus_per_worker, or add nodes")
        raise ResourceError(f"{asked} need {world * each:g} {kind}s but the Ray cluster has {inventory}; {fix}")
    if world > sum(fits.values()):
        raise ResourceError(f"{asked} do not fit the nodes of the Ray cluster ({inventory}): each node holds "
                            f"{'+'.join(map(str, fits.values()))} = {sum(fits.values())} workers; pick a "
                            f"cluster.cpus_per_worker that divides the {kind}s per node, lower parallelism.dp, "
                            f"or add nodes")
    return Capacity(use_gpu, kind, each, total, free.get(kind, 0), fits)
