"""Validation, in the order a job meets it; every stage runs on the driver before any worker starts, and
each rule lives in exactly one stage. A failure is a ConfigError whose message is one line naming the key
and the fix.

1. compose (Hydra + tp2d_exp.config.schema): unknown keys, wrong types, unknown enum values;
   ParallelDims (tp, dp >= 1) and Architecture.of (a local config.json of an unsupported family) when the
   spec is built.
2. config (`check_config`): values against each other, the model's architecture, local paths (the start of
   each text file, a local tokenizer's JSON), the environment. No network, no torch: about a second.
3. data (`check_tokenizer`, `check_corpus`): what the tokenizer and the tokenized corpus turn out to be
   (tp2d_exp.driver.prepare loads them; a checkpoint to start from is checked there too:
   tp2d_exp.checkpoint.manager.find_start, and the settings a same-name rerun must keep).
4. cluster (`check_cluster`): what the Ray cluster holds, once connected (tp2d_exp.driver.cluster).
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field

from tp2d_exp.config.errors import ConfigError, ResourceError, first_line
from tp2d_exp.config.schema import DataSource, Device, HardwareConfig
from tp2d_exp.config.spec import Architecture, JobSpec
from tp2d_exp.storage import file_version, open_file

ADDRESS = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")
# More parameters than this is a typo, not a model: ten times the largest dense models trained so far.
MAX_PARAMETERS = 10**13
# The synthetic corpus is generated in memory on the driver: about 2 min and 0.5 GB of text per million.
MAX_SYNTHETIC_DOCUMENTS = 10**6
# An epoch's order is a permutation of its samples held by every rank (4 bytes each): 8 GiB at this bound.
MAX_MIXTURE_SAMPLES = 2**31 - 1
MAX_BUILD_PROCESSES = 1024  # tokenizer processes of one machine's store build
# Ray Train turns its worker-group start timeout into timers that need a finite, modest number of seconds.
MAX_RESOURCE_WAIT_S = 7 * 24 * 3600
# BatchOrder seeds each epoch's shuffle with seed * 1_000_003 + epoch, which must stay a 64-bit seed.
MAX_SEED = 2**32 - 1


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def looks_local(path_or_id: str) -> bool:
    """Whether a model, tokenizer or dataset name means a local path rather than a hub id."""
    return path_or_id.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(path_or_id))


def check_config(spec: JobSpec) -> None:
    """Stage 2: raise ConfigError for the first value that cannot work."""
    dims, arch, m, d, r, c = spec.dims, spec.arch, spec.model, spec.data, spec.run, spec.cluster
    _check_architecture(arch)
    dims.check_model(arch, d.seq_length)
    for key, value, example in (("model.name_or_path", m.name_or_path, "Qwen/Qwen2.5-0.5B"),
                                ("model.tokenizer", m.tokenizer, "Qwen/Qwen2.5-0.5B")):
        if value and looks_local(value):
            _require(os.path.isdir(os.path.expanduser(value)),
                     f"{key}={value!r} is not a directory; give a local Hugging Face dir or a hub id like {example}")
    tokenizer = m.tokenizer or m.name_or_path
    if tokenizer and os.path.isdir(os.path.expanduser(tokenizer)):
        _check_json_files("model.tokenizer" if m.tokenizer else "model.name_or_path", tokenizer,
                          ("tokenizer.json", "tokenizer_config.json"))
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
    _check_sources(spec)

    _require(r.batch_size_per_gpu >= 1, f"run.batch_size_per_gpu={r.batch_size_per_gpu} must be positive")
    _require(r.learning_rate > 0 and math.isfinite(r.learning_rate),
             f"run.learning_rate={r.learning_rate} must be positive")
    _require(0 <= r.min_lr_ratio <= 1, f"run.min_lr_ratio={r.min_lr_ratio} must be in [0, 1] (a fraction of "
             "run.learning_rate)")
    for key in ("adam_beta1", "adam_beta2"):
        beta = getattr(r, key)
        _require(0 <= beta < 1, f"run.{key}={beta} must be in [0, 1)")
    _require(r.max_grad_norm >= 0 and not math.isnan(r.max_grad_norm),
             f"run.max_grad_norm={r.max_grad_norm} must be >= 0 (0 = no clipping)")
    _require(0 <= r.seed <= MAX_SEED, f"run.seed={r.seed} must be in 0..{MAX_SEED}")
    for key in ("warmup_steps", "lr_decay_steps"):
        _require(getattr(r, key) >= 0, f"run.{key}={getattr(r, key)} must be >= 0")
    for key in ("fail_at_step", "nan_at_step"):
        _require(getattr(r.fault, key) >= 0, f"run.fault.{key}={getattr(r.fault, key)} must be >= 0 (0 = never)")
    _require(r.max_steps >= 0, f"run.max_steps={r.max_steps} must be >= 0 (0 = no limit)")
    _require(r.eval_every >= 0, f"run.eval_every={r.eval_every} must be >= 0 (0 = evaluate at the end only)")
    _require(r.eval_samples >= 0, f"run.eval_samples={r.eval_samples} must be >= 0 (0 = the whole held-out set)")
    _require(0 <= d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in [0, 1) (0 = no evaluation)")
    _require(r.num_epochs >= 1, f"run.num_epochs={r.num_epochs} must be positive")
    _require(r.log_interval >= 1, f"run.log_interval={r.log_interval} must be positive")
    _require(r.weight_decay >= 0 and math.isfinite(r.weight_decay), f"run.weight_decay={r.weight_decay} must be >= 0")
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

    lg = spec.logger
    _require(lg.min_free_mb >= 0, f"logger.min_free_mb={lg.min_free_mb} must be >= 0 (0 = never switch W&B off)")
    if spec.resolved.wandb is not None:
        _require(bool(lg.project), "logger.project is empty; name a W&B project")
        _require(lg.entity != "", "logger.entity is empty; use null (your default entity) or a W&B user or team")

    if not r.plan_only:  # a plan never touches the cluster
        _check_address(c.address)
        _require(0 < c.resource_wait_s <= MAX_RESOURCE_WAIT_S,
                 f"cluster.resource_wait_s={c.resource_wait_s} must be in (0, {MAX_RESOURCE_WAIT_S}] (a week)")
        _require(c.cpus_per_worker > 0 and math.isfinite(c.cpus_per_worker),
                 f"cluster.cpus_per_worker={c.cpus_per_worker} must be positive")
        _require(1 <= c.min_dp <= dims.dp, f"cluster.min_dp={c.min_dp} must be in 1..parallelism.dp={dims.dp}")
        if c.elastic:
            gbs = spec.resolved.global_batch_size
            _require(gbs % (r.batch_size_per_gpu * c.min_dp) == 0,
                     f"cluster.min_dp={c.min_dp}: the global batch of {gbs} samples is not a multiple of "
                     f"run.batch_size_per_gpu*min_dp={r.batch_size_per_gpu * c.min_dp}, so that mesh could not keep "
                     "it; pick a cluster.min_dp that divides parallelism.dp, or set run.global_batch_size")
            _require(r.checkpoint_every > 0, "cluster.elastic=true resumes each resize from the newest checkpoint "
                     "and grows back at the next one: set run.checkpoint_every (steps) > 0")
        storage = c.storage_path
        _require(not storage or not os.path.isfile(os.path.expanduser(storage)),
                 f"cluster.storage_path={storage!r} is a file; give a dir (created if missing) or a URI like "
                 "s3://bucket/path")
    _check_hardware(spec.hardware)


# Bytes of each text file read to tell text from binary: enough for any binary format's header, little enough
# for a corpus of many thousand files (the data stage reads them all and names a file that fails later on).
SNIFF_BYTES = 4096


def _check_sources(spec: JobSpec) -> None:
    """`data` itself, or each entry of `data.mixture`: a source that names what it needs, and what the store
    settings need."""
    from tp2d_exp.config.spec import text_files

    d = spec.data
    _require(0 <= d.mixture_samples <= MAX_MIXTURE_SAMPLES, f"data.mixture_samples={d.mixture_samples} must be in "
             f"0..{MAX_MIXTURE_SAMPLES} (0 = the sum of the sources' samples)")
    _require(0 <= d.build_processes <= MAX_BUILD_PROCESSES, f"data.build_processes={d.build_processes} must be in "
             f"0..{MAX_BUILD_PROCESSES} (0 = one per core)")
    _require(not d.store_dir or not os.path.isfile(os.path.expanduser(d.store_dir)),
             f"data.store_dir={d.store_dir!r} is a file; give a directory (created if missing) on a POSIX filesystem")
    if d.source is DataSource.store:
        _require(bool(d.path) and os.path.isfile(os.path.join(os.path.expanduser(d.path or ""), "meta.json")),
                 f"data.path={d.path!r} is not a token store (no meta.json in it); give a store dir that "
                 "scripts/build_store.py built, or use data.source=text_files")
        return
    if d.source is not DataSource.mixture:
        _check_source("data", d, spec.resolved.data_files)
        return
    _require(len(d.mixture) >= 1, "data.source=mixture but data.mixture is empty; list the sources, e.g. "
             "data.mixture='[{path: a.txt, weight: 3}, {path: b.jsonl, weight: 1}]'")
    for i, m in enumerate(d.mixture):
        key = f"data.mixture[{i}]"
        _require(m.source in (DataSource.text_files, DataSource.hf, DataSource.synthetic),
                 f"{key}.source={m.source} cannot be mixed; use text_files, hf or synthetic")
        _require(m.weight > 0 and math.isfinite(m.weight), f"{key}.weight={m.weight} must be positive (a share "
                 "of the mixture's samples); drop the source to leave it out")
        _check_source(key, m, tuple(text_files(m.path)) if m.path and m.source is DataSource.text_files else ())


def _check_source(key: str, c, files: tuple[str, ...]) -> None:
    """One source (`data`, or an entry of `data.mixture`: the same keys)."""
    _require(bool(c.text_field.strip()), f"{key}.text_field={c.text_field!r} is empty; name the column that holds "
             "the text (default: text)")
    if c.source is DataSource.text_files:
        _require(bool(c.path), f"{key}.path is not set; give a file, dir or glob of .txt/.jsonl/.json/.parquet files")
        _require(bool(files), f"{key}.path={c.path!r} matches no .txt/.jsonl/.json/.parquet file; check the path")
        _check_text_files(f"{key}.path", c.path, files)
    if c.source is DataSource.hf:
        _require(bool(c.hf_name), f"{key}.hf_name is not set; name a Hugging Face dataset (e.g. Salesforce/wikitext), "
                 "a local dataset dir or a datasets.save_to_disk dir")
        if looks_local(c.hf_name):
            _require(os.path.isdir(os.path.expanduser(c.hf_name)), f"{key}.hf_name={c.hf_name!r} is not a directory; "
                     "give a local dataset dir, a save_to_disk dir or a hub id like Salesforce/wikitext")
    if c.source is DataSource.synthetic:
        _require(1 <= c.synthetic_documents <= MAX_SYNTHETIC_DOCUMENTS,
                 f"{key}.synthetic_documents={c.synthetic_documents} must be in 1..{MAX_SYNTHETIC_DOCUMENTS} (the "
                 "corpus is generated in memory on the driver); for more text use data=text_files")


def _check_text_files(key: str, path: str, files: tuple[str, ...]) -> None:
    """A text_files corpus: not all empty, and each text file's start UTF-8 (a binary file named .txt)."""
    _require(any(file_version(f)[0] for f in files),
             f"{key}={path!r}: every file it matches is empty ({files[0]}{', ...' * (len(files) > 1)}); "
             "point it at text")
    for f in files:
        if f.endswith(".parquet"):
            continue
        with open_file(f) as fh:
            head = fh.read(SNIFF_BYTES)
        try:  # final=False: the sniff may cut a multi-byte character in two
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            binary = b"\0" in head
        except UnicodeDecodeError:
            binary = True
        _require(not binary, f"{key}={path!r}: {f} is not UTF-8 text (binary bytes in its first "
                 f"{SNIFF_BYTES} bytes); convert it or leave it out of {key}")


def _check_json_files(key: str, directory: str, names: tuple[str, ...]) -> None:
    """The JSON files a local model or tokenizer dir holds parse (transformers' own error is a traceback)."""
    for name in names:
        file = os.path.join(os.path.expanduser(directory), name)
        if os.path.isfile(file):
            try:
                with open(file, "rb") as fh:
                    json.load(fh)
            except ValueError as e:  # not UTF-8 or not JSON
                raise ConfigError(f"{key}={directory!r}: {name} is not JSON ({first_line(e)}); give a Hugging "
                                  "Face model or tokenizer dir") from None


def _check_architecture(arch: Architecture) -> None:
    """The effective architecture (the model keys, or a local model dir's config.json) can be built."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings"):
        _require(getattr(arch, key) >= 1, f"model.{key}={getattr(arch, key)} must be positive")
    _require(arch.hidden_size % arch.num_attention_heads == 0,
             f"model.num_attention_heads={arch.num_attention_heads} does not divide model.hidden_size="
             f"{arch.hidden_size}; heads split the hidden size evenly")
    _require(arch.num_attention_heads % arch.num_key_value_heads == 0,
             f"model.num_key_value_heads={arch.num_key_value_heads} does not divide model.num_attention_heads="
             f"{arch.num_attention_heads}; each KV head serves a whole group of query heads")
    _require(arch.rope_theta > 0 and math.isfinite(arch.rope_theta),
             f"model.rope_theta={arch.rope_theta} must be positive")
    _require(0 < arch.rms_norm_eps < 1, f"model.rms_norm_eps={arch.rms_norm_eps} must be in (0, 1)")
    h, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    params = arch.num_hidden_layers * (4 * h * h + 3 * h * i) + 2 * v * h  # about: attention, MLP, embeddings
    _require(params <= MAX_PARAMETERS,
             f"model.hidden_size={h}, model.num_hidden_layers={arch.num_hidden_layers}, model.intermediate_size={i} "
             f"and model.vocab_size={v} make about {params:.2g} parameters, more than any hardware holds "
             f"({MAX_PARAMETERS:.0e}); check these keys")


def _check_hardware(hw: HardwareConfig) -> None:
    """The interconnect profile plan_only predicts with and the GPU table MFU divides by."""
    _require(hw.gpu in hw.gpus, f"hardware.gpu={hw.gpu!r} is not in the GPU table; "
             f"use one of {', '.join(hw.gpus)} or add a row to conf/hardware/gpus.yaml")
    _require(hw.gpus_per_node >= 1, f"hardware.gpus_per_node={hw.gpus_per_node} must be positive")
    for key in ("intra_node_gbps", "inter_node_gbps"):
        value = getattr(hw, key)
        _require(value > 0 and math.isfinite(value), f"hardware.{key}={value} must be positive")
    for key in ("intra_node_latency_us", "inter_node_latency_us"):
        value = getattr(hw, key)
        _require(value >= 0 and math.isfinite(value), f"hardware.{key}={value} must be >= 0")
    _require(0 <= hw.allocator_overhead < 1, f"hardware.allocator_overhead={hw.allocator_overhead} must be in "
             "[0, 1) (reserved over allocated memory at the peak, less 1)")
    memory = hw.gpus[hw.gpu].memory_gib
    _require(0 <= hw.cuda_context_gib < memory, f"hardware.cuda_context_gib={hw.cuda_context_gib} must be in "
             f"[0, {memory:g}) (hardware.gpu={hw.gpu} has {memory:g} GiB)")
    for name, row in hw.gpus.items():
        for key in ("peak_bf16_tflops", "memory_gib", "hbm_tbps"):
            value = getattr(row, key)
            _require(value > 0 and math.isfinite(value), f"hardware.gpus.{name}.{key}={value} must be positive")
        _require(0 < row.gemm_efficiency <= 1, f"hardware.gpus.{name}.gemm_efficiency={row.gemm_efficiency} must "
                 "be in (0, 1]")


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
    r, dp = spec.run, spec.dims.dp
    batch = (f"run.global_batch_size={gbs}" if r.global_batch_size else
             f"{gbs} = run.batch_size_per_gpu={r.batch_size_per_gpu} x parallelism.dp={dp}")
    _require(num_samples >= gbs, f"the corpus has {num_samples} samples of data.seq_length={seq}, fewer than one "
             f"global batch ({batch}); lower these keys or add data")


def check_heldout(spec: JobSpec, num_samples: int) -> None:
    """Stage 3: the held-out store (data.val_fraction) holds at least one global eval batch: a micro-batch
    per dp rank (a last partial one is padded and masked, but an evaluation of less than one batch per rank
    measures next to nothing)."""
    d, r, dp = spec.data, spec.run, spec.dims.dp
    _require(num_samples > 0, f"data.val_fraction={d.val_fraction} holds out documents that make no sample of "
             f"data.seq_length={d.seq_length}; raise data.val_fraction, or set it to 0 (no evaluation)")
    scored = min(num_samples, r.eval_samples) if r.eval_samples else num_samples
    batch = r.batch_size_per_gpu * dp
    fix = ("raise run.eval_samples" if scored < num_samples else "raise data.val_fraction (or add data)") + \
        ", or set data.val_fraction=0 to train without evaluation"
    _require(scored >= batch, f"the held-out set scores {scored} samples (run.eval_samples={r.eval_samples}, "
             f"{num_samples} held out by data.val_fraction={d.val_fraction}), fewer than one global eval batch "
             f"(run.batch_size_per_gpu={r.batch_size_per_gpu} x parallelism.dp={dp}); {fix}")


@dataclass(frozen=True)
class Capacity:
    """What the cluster holds for this job's workers."""

    use_gpu: bool
    kind: str  # the resource a worker reserves: GPU, or CPU on a CPU-only run
    per_worker: float
    total: float  # of `kind`, over the alive nodes
    free: float  # not held by other jobs right now
    workers_per_node: dict[str, int]  # node id -> workers it can hold
    memory_per_node: dict[str, float] = field(default_factory=dict)  # node id -> Ray's memory resource (bytes)

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
    return Capacity(use_gpu, kind, each, total, free.get(kind, 0), fits,
                    {node: res["memory"] for node, res in nodes.items() if "memory" in res})
