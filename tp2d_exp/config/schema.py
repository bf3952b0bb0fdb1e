"""The config schema: one frozen dataclass per Hydra group, enums for every closed set of choices.

The schemas are registered in Hydra's ConfigStore as the base of every group file, so a misspelled key, a
wrong type or an unknown enum value (`run.activation_checkpointing=sometimes`) fails at compose time, before
any of our code runs. `OmegaConf.to_object` turns the composed config into instances of these classes; they
are frozen, so nothing downstream can change what the user asked for (derived values live in
`tp2d_exp.config.spec.Resolved`).

No torch, Ray or transformers here: the driver composes and validates in about a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from tp2d_exp.config.parallel_dims import ParallelDims

# Enums: OmegaConf matches a YAML or command-line value to a member by name, so names equal values.


class Family(StrEnum):
    """Model families with TP styles. Qwen2, Llama and Mistral share HF's decoder module names, so one set of
    styles serves all three (tp2d_exp.train.parallelize)."""

    qwen2 = "qwen2"
    llama = "llama"
    mistral = "mistral"


class AttnImplementation(StrEnum):
    """transformers' attention back-ends (`attn_implementation`)."""

    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"
    flash_attention_3 = "flash_attention_3"
    flex_attention = "flex_attention"


class DataSource(StrEnum):
    synthetic = "synthetic"  # generated offline by the project
    text_files = "text_files"  # local .txt/.jsonl/.json/.parquet files
    hf = "hf"  # a Hugging Face dataset: hub id, local data dir or datasets.save_to_disk dir
    mixture = "mixture"  # data.mixture: several of the above, each with a weight
    store = "store"  # data.path: a token store built earlier (scripts/build_store.py), used as it is


class ActivationCheckpointing(StrEnum):
    none = "none"
    selective = "selective"  # torchtitan's op policy: keep every other matmul, attention, TP reductions
    full = "full"  # keep each decoder layer's input only


class NonFinite(StrEnum):
    stop = "stop"  # the run fails, naming the step
    skip = "skip"  # drop the update and go on


# `raise` is a Python keyword, so this enum is built with the functional API (member access: FaultMode["raise"]).
FaultMode = StrEnum("FaultMode", [("raise", "raise"), ("exit", "exit")])
FaultMode.__doc__ = "raise: a Python exception; exit: the process dies at once (os._exit), like a lost node."


class Device(StrEnum):
    auto = "auto"  # CUDA + NCCL when the cluster has GPUs, else CPU + gloo
    cpu = "cpu"
    cuda = "cuda"


class LoggerBackend(StrEnum):
    wandb = "wandb"
    none = "none"


class WandbMode(StrEnum):
    auto = "auto"  # online when credentials exist, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


def local_path(expects: str) -> Any:
    """An optional key that may name a local path, `expects` "file" or "dir" (a file key also takes a dir or
    glob; a dir key also takes a hub id, a run name or a URI). The tag is what tests/test_bad_inputs.py
    generates missing, empty, wrong-kind and garbage paths from, so a new path key is covered once tagged."""
    return field(default=None, metadata={"path": expects})


@dataclass(frozen=True)
class ModelConfig:
    name: str = MISSING
    # Hub id or local dir. null: build the architecture below from scratch (the offline `tiny` model).
    name_or_path: Optional[str] = local_path("dir")
    # Load weights from name_or_path; false = random init of the architecture (seeded, same on every mesh).
    pretrained: bool = False
    # Tokenizer hub id or dir; null = name_or_path, or the project's own BPE when name_or_path is null.
    tokenizer: Optional[str] = local_path("dir")
    family: Family = Family.qwen2
    # Architecture facts, kept here so validation and planning work without a download. A local
    # name_or_path's config.json overrides them (the effective ones: JobSpec.resolved.arch).
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    intermediate_size: int = 768
    vocab_size: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    attention_bias: Optional[bool] = None  # null: the family's default (Qwen2 has q/k/v biases)
    attn_implementation: AttnImplementation = AttnImplementation.sdpa


@dataclass(frozen=True)
class MixtureSource:
    """One source of `data.mixture`; the keys mean what they mean at the top of `data`."""

    source: DataSource = DataSource.text_files  # text_files | hf | synthetic
    weight: float = 1.0  # share of the mixture's samples: weight / sum of the weights
    path: Optional[str] = local_path("file")
    hf_name: Optional[str] = local_path("dir")
    hf_config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    synthetic_documents: int = 3000


@dataclass(frozen=True)
class DataConfig:
    name: str = MISSING
    source: DataSource = DataSource.synthetic
    # text_files: a file, dir or glob of .txt/.jsonl/.json/.parquet; store: a token store's dir
    path: Optional[str] = local_path("file")
    hf_name: Optional[str] = local_path("dir")  # a hub id, a local dataset dir or a save_to_disk dir
    hf_config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False  # hf: read a hub dataset as it downloads (for corpora larger than the disk cache)
    # source=mixture: e.g. [{path: a.jsonl, weight: 3}, {source: hf, hf_name: org/name, weight: 1}]
    mixture: list[MixtureSource] = field(default_factory=list)
    mixture_samples: int = 0  # samples in an epoch of the mixture; 0 = the sum of its sources' samples
    # Where token stores are built and found (a POSIX path; shared by the nodes of a cluster, which then
    # build each store once). null: outputs/cache/stores.
    store_dir: Optional[str] = local_path("dir")
    build_processes: int = 0  # tokenizer processes of a local build; 0 = one per core this process may use
    seq_length: int = 256
    dataset_percentage: float = 100.0
    # Pack documents into seq_length blocks joined by EOS (no padding); false = one padded line per sample.
    packing: bool = True
    # Packed blocks: each token attends only to earlier tokens of its own document (position ids restart
    # after every EOS; HF builds the block-diagonal causal mask for sdpa/eager/flex, flash-attention runs
    # varlen). Off: plain causal attention across the block (SDPA's fast causal path).
    attention_within_documents: bool = False
    synthetic_documents: int = 3000
    # Held out for evaluation: the last share of the corpus's documents (in corpus order, after
    # dataset_percentage), tokenized into a store of their own and never trained on. 0 = no evaluation.
    val_fraction: float = 0.0


@dataclass(frozen=True)
class FaultConfig:
    """Test-only fault injection; everything off by default. A worker fault fires on the job's first attempt only
    (a marker file in the run dir), so the restarted worker group runs through."""

    fail_at_step: int = 0  # the worker of `rank` fails when it reaches this step (1-based); 0 = never
    rank: int = 0
    mode: FaultMode = FaultMode["raise"]
    nan_at_step: int = 0  # the loss of this step becomes NaN, on every attempt (exercises run.nonfinite); 0 = never


@dataclass(frozen=True)
class RunConfig:
    name: Optional[str] = None  # Ray run name; same name = resume its latest checkpoint. null: unique per job
    # Optimizer steps; 0 = no limit (num_epochs decides). Fixed in samples (x the global batch of the run's
    # first start) and counted from sample 0 of the checkpoint's history, also under run.resume_from: from a
    # checkpoint at 800 samples, max_steps=150 at global batch 8 ends at 1200 samples, i.e. 50 more steps.
    max_steps: int = 0
    num_epochs: int = 1
    batch_size_per_gpu: int = 4  # micro-batch per device
    global_batch_size: int = 0  # 0 = batch_size_per_gpu * dp (JobSpec.resolved); larger = gradient accumulation
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    lr_decay_steps: int = 0  # cosine horizon; 0 = the run's total steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still logged)
    seed: int = 42
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none  # per decoder layer
    compile: bool = False  # torch.compile each decoder layer (CUDA only)
    log_interval: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at epoch ends and at the end of training
    # Write checkpoints in the background (DCP async_save over a gloo group of its own) while the next steps
    # train: training blocks only while the state is copied to CPU memory, which costs a copy of this rank's
    # model + optimizer shard in host RAM (see the README's checkpoint figures).
    checkpoint_async: bool = False
    num_to_keep: int = 2  # falling back past a corrupt latest checkpoint needs >= 2
    max_failures: int = 0  # worker-group restarts (from the latest intact checkpoint) before the run fails
    # Start from a checkpoint on any mesh: a checkpoint dir, a Ray run dir or a run name under
    # cluster.storage_path (its newest intact checkpoint). The run's own checkpoints take precedence.
    resume_from: Optional[str] = local_path("dir")
    nonfinite: NonFinite = NonFinite.stop  # non-finite loss or grad norm
    # Held-out loss (data.val_fraction > 0): every eval_every steps and at the end; 0 = at the end only.
    # Scores the first eval_samples samples of the held-out store (0 = all of them), the same on every mesh.
    eval_every: int = 0
    eval_samples: int = 32
    fault: FaultConfig = field(default_factory=FaultConfig)
    # The n-th step of a job (1-based; 2 = after a warm-up step) whose collectives are counted by kind and
    # mesh dim; the profiler then times the next `profile_steps` steps. Those steps carry instrumentation
    # overhead and are left out of the summary's throughput. 0 = no measurement.
    measure_step: int = 2
    profile_steps: int = 2
    # Print the job's plan (memory per rank, TP vs FSDP bytes and time on `hardware`) and write it to
    # summary.json, without tokenizing data, downloading weights or starting Ray.
    plan_only: bool = False


@dataclass(frozen=True)
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.wandb
    project: str = "tp2d_exp"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto
    group: Optional[str] = None  # null: the sweep id under -m, else the run name
    tags: list[str] = field(default_factory=list)
    # W&B drops records silently on a full disk: below this much free space in its dir W&B is switched off
    # (reported once); metrics.jsonl goes on.
    min_free_mb: int = 100


@dataclass(frozen=True)
class ClusterConfig:
    # null: start Ray locally. Attach to a running cluster (token auth on): "auto" (the cluster started on
    # this machine), "host:port" (a head's GCS port) or "ray://host:port" (Ray Client, needs ray[client]).
    address: Optional[str] = None
    device: Device = Device.auto
    cpus_per_worker: float = 1.0
    # Ray storage (checkpoints); null: <project>/outputs/ray. On several nodes: a path every node mounts
    # (checked at launch) or a URI (s3://bucket/path, gs://...).
    storage_path: Optional[str] = local_path("dir")
    # How long Ray Train may wait for a busy cluster to free the workers' resources before the run fails
    # (Ray Train V2 alone would retry forever).
    resource_wait_s: float = 60.0
    # Elastic (tp2d_exp.driver.elastic): on a lost node or a preemption, go on from the newest checkpoint on the
    # largest dp' <= parallelism.dp that the remaining nodes hold in whole TP groups (tp kept, the global batch
    # kept by gradient accumulation), and grow back to parallelism.dp at the first checkpoint after capacity
    # returns. A failure still counts against run.max_failures; a preemption does not.
    elastic: bool = False
    min_dp: int = 1  # elastic: the smallest dp to go on with; below it the run waits (resource_wait_s), then fails
    verbose: bool = False  # show Ray's and the libraries' logs on the console


@dataclass  # not frozen: OmegaConf creates the `gpus` entries from this type while merging, read-only if frozen
class GpuSpec:
    # Substrings that must all appear in torch.cuda.get_device_name() for a device to be this GPU.
    match: list[str] = MISSING
    peak_bf16_tflops: float = MISSING  # dense (no 2:4 sparsity), the figure MFU divides by
    memory_gib: float = MISSING
    hbm_tbps: float = MISSING  # memory bandwidth (datasheet), what memory-bound work runs at
    # Large bf16 GEMMs reach this fraction of the peak (tp2d_exp.perf.timing: the roofline and a launch
    # overhead take it down for small ones). Fitted once (gpus.yaml says on what).
    gemm_efficiency: float = MISSING


@dataclass(frozen=True)
class HardwareConfig:
    """An interconnect profile plus the GPU table: what plan_only predicts for and what MFU divides by."""

    name: str = MISSING
    gpu: str = MISSING  # the key of `gpus` plan_only assumes (a real run detects its GPU)
    gpus_per_node: int = 8
    # Bus bandwidth per GPU in GB/s as nccl-tests reports it (time = bytes x algorithm factor / busbw).
    intra_node_gbps: float = MISSING  # NVLink / NVSwitch
    inter_node_gbps: float = MISSING  # InfiniBand / RoCE
    intra_node_latency_us: float = 10.0  # per collective call
    inter_node_latency_us: float = 25.0
    # The caching allocator's reserved memory over its allocated memory at the step's peak, less 1 (block
    # rounding, per-stream pools, fragmentation): predicted reserved = modelled peak x (1 + this). Fitted on
    # torchtitan's published max-reserved figures (conf/hardware/gpus.yaml, README "Mesh sweeps").
    allocator_overhead: float = 0.152
    # Outside the allocator: the CUDA context, cuBLAS workspaces and NCCL's buffers. A plan fits when
    # predicted reserved + this <= the GPU's memory.
    cuda_context_gib: float = 1.0
    gpus: dict[str, GpuSpec] = field(default_factory=dict)

    def gpu_for(self, device_name: str) -> Optional[GpuSpec]:
        """The GPU table row of a device name (torch.cuda.get_device_name): the most specific row whose
        substrings all occur in it."""
        rows = [g for g in self.gpus.values() if all(m in device_name for m in g.match)]
        return max(rows, key=lambda g: len(g.match), default=None)


@dataclass(frozen=True)
class Config:
    # Typed nodes: every group file merges into its schema, so unknown keys and wrong types fail at compose.
    model: ModelConfig = field(default_factory=ModelConfig)
    parallelism: ParallelDims = field(default_factory=ParallelDims)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


def structured(schema: type) -> DictConfig:
    """A schema class as an OmegaConf node that configs can be merged into. OmegaConf marks the node of a
    frozen dataclass read-only, which would stop Hydra from merging group files and overrides into it;
    `OmegaConf.to_object` still builds frozen instances from the writable node."""

    def writable(node: DictConfig) -> DictConfig:
        OmegaConf.set_readonly(node, None)
        for key in node:
            if not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig):
                writable(node[key])
        return node

    return writable(OmegaConf.structured(schema))


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=structured(Config))


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: list[str]) -> DictConfig:
    """The config run.py composes for these command-line overrides, for tools that are not a Hydra app
    (scripts/evaluate.py, tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)
