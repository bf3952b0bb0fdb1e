"""Config schema (one dataclass per Hydra group) and validation that runs before any worker starts.

The schemas are registered in Hydra's ConfigStore as the base of every group file, so a misspelled key or
a wrong type fails at compose time. `validate` then checks what types cannot: values that do not fit the
model, the mesh or the files on disk. Each failure is one line that names the key and the fix.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

TP_FAMILIES = ("qwen2", "llama", "mistral")  # families with a TP plan (tp2d_exp.model.TP_PLANS)
ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
             "rope_theta", "rms_norm_eps")


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key and the fix."""


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub id or local dir. null: build the architecture below from scratch (the offline `tiny` model).
    name_or_path: Optional[str] = None
    # Load weights from name_or_path; false = random init of the architecture (seeded, same on every mesh).
    pretrained: bool = False
    # Tokenizer hub id or dir; null = name_or_path, or the project's own BPE when name_or_path is null.
    tokenizer: Optional[str] = None
    family: str = "qwen2"
    # Architecture facts, kept here so validation and planning work without a download. A local
    # name_or_path's config.json overrides them.
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
    attn_implementation: str = "sdpa"


@dataclass
class ParallelismConfig:
    tp: int = 1
    dp: int = 1
    # TP options (no effect at tp=1). Sequence parallel: norms and the residual stream sharded along the
    # sequence between TP regions (activation memory / tp; needs data.seq_length divisible by tp).
    sequence_parallel: bool = False
    # Loss parallel: lm_head (and the embedding, which may be tied to it) sharded over the vocabulary and
    # cross-entropy computed on the logit shards, so the full logits are never gathered (torchtitan's
    # default too): lm_head's FLOPs, its parameters and the logits' memory / tp.
    loss_parallel: bool = True


@dataclass
class DataConfig:
    name: str = MISSING
    # synthetic: generated offline by the project; text_files: local files; hf: a Hugging Face dataset.
    source: str = "synthetic"
    path: Optional[str] = None  # text_files: a file, dir or glob of .txt/.jsonl/.json/.parquet
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    seq_length: int = 256
    dataset_percentage: float = 100.0
    # Pack documents into seq_length blocks joined by EOS (no padding); false = one padded line per sample.
    packing: bool = True
    # Packed blocks: each token attends only to earlier tokens of its own document (position ids restart
    # after every EOS; HF builds the block-diagonal causal mask for sdpa/eager/flex, flash-attention runs
    # varlen). Off: plain causal attention across the block (SDPA's fast causal path).
    attention_within_documents: bool = False
    synthetic_documents: int = 3000


@dataclass
class FaultConfig:
    """Test-only fault injection; everything off by default. A worker fault fires on the job's first attempt only
    (a marker file in the run dir), so the restarted worker group runs through."""

    fail_at_step: int = 0  # the worker of `rank` fails when it reaches this step (1-based); 0 = never
    rank: int = 0
    mode: str = "raise"  # raise: a Python exception; exit: the process dies at once (os._exit), like a lost node
    nan_at_step: int = 0  # the loss of this step becomes NaN, on every attempt (exercises run.nonfinite); 0 = never


@dataclass
class RunConfig:
    name: Optional[str] = None  # Ray run name; same name = resume its latest checkpoint. null: unique per job
    max_steps: int = 0  # optimizer steps; 0 = no limit (num_epochs decides)
    num_epochs: int = 1
    batch_size_per_gpu: int = 4  # micro-batch per device
    global_batch_size: int = 0  # 0 = batch_size_per_gpu * dp; larger = gradient accumulation
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    lr_decay_steps: int = 0  # cosine horizon; 0 = the run's total steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still logged)
    seed: int = 42
    # Per decoder layer: none | selective (keep matmul/attention outputs, recompute the rest) | full
    activation_checkpointing: str = "none"
    compile: bool = False  # torch.compile each decoder layer (CUDA only)
    log_interval: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end of training
    num_to_keep: int = 2  # falling back past a corrupt latest checkpoint needs >= 2
    max_failures: int = 0  # worker-group restarts (from the latest intact checkpoint) before the run fails
    # Start from a checkpoint on any mesh: a checkpoint dir, a Ray run dir or a run name under
    # cluster.storage_path (its newest intact checkpoint). The run's own checkpoints take precedence.
    resume_from: Optional[str] = None
    nonfinite: str = "stop"  # non-finite loss or grad norm: stop (the run fails, naming the step) | skip the update
    fault: FaultConfig = field(default_factory=FaultConfig)
    # The n-th step of a job (1-based; 2 = after a warm-up step) whose collectives are counted by kind and
    # mesh dim; the profiler then times the next `profile_steps` steps. Those steps carry instrumentation
    # overhead and are left out of the summary's throughput. 0 = no measurement.
    measure_step: int = 2
    profile_steps: int = 2
    # Print the analytic plan (memory per rank, TP vs FSDP bytes and time on `hardware`) and write it to
    # summary.json, without tokenizing data, downloading weights or starting Ray.
    plan_only: bool = False


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "tp2d_exp"
    entity: Optional[str] = None
    # auto: online when credentials exist, else offline; online | offline | disabled
    mode: str = "auto"
    group: Optional[str] = None  # null: the sweep id under -m, else the run name
    tags: list[str] = field(default_factory=list)
    # W&B drops records silently on a full disk: below this much free space in its dir W&B is switched off
    # (reported once); metrics.jsonl goes on.
    min_free_mb: int = 100


@dataclass
class ClusterConfig:
    # null: start Ray locally. Attach to a running cluster (token auth on): "auto" (the cluster started on
    # this machine), "host:port" (a head's GCS port) or "ray://host:port" (Ray Client, needs ray[client]).
    address: Optional[str] = None
    device: str = "auto"  # auto: CUDA + NCCL when the cluster has GPUs, else CPU + gloo
    cpus_per_worker: float = 1.0
    # Ray storage (checkpoints); null: <project>/outputs/ray. On several nodes: a path every node mounts
    # (checked at launch) or a URI (s3://bucket/path, gs://...).
    storage_path: Optional[str] = None
    # How long Ray Train may wait for a busy cluster to free the workers' resources before the run fails
    # (Ray Train V2 alone would retry forever).
    resource_wait_s: float = 60.0
    verbose: bool = False  # show Ray's and the libraries' logs on the console


@dataclass
class GpuSpec:
    # Substrings that must all appear in torch.cuda.get_device_name() for a device to be this GPU.
    match: list[str] = MISSING
    peak_bf16_tflops: float = MISSING  # dense (no 2:4 sparsity), the figure MFU divides by
    memory_gib: float = MISSING


@dataclass
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
    assumed_mfu: float = 0.4  # compute efficiency plan_only assumes for the step time
    usable_memory_fraction: float = 0.9  # of GPU memory left after CUDA context, NCCL buffers, fragmentation
    gpus: dict[str, GpuSpec] = field(default_factory=dict)


@dataclass
class Config:
    # Typed nodes: every group file merges into its schema, so unknown keys and wrong types fail at compose.
    model: ModelConfig = field(default_factory=ModelConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


def is_uri(path: str) -> bool:
    """s3://, gs://, abfss://, ...: storage Ray reaches through pyarrow, the same from every node."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path))


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)


def job_dict(cfg: DictConfig, *, root: Path, output_dir: Path, job_num: Optional[int] = None,
             sweep_dir: Optional[Path] = None) -> dict[str, Any]:
    """The resolved config as a plain dict (what workers get) plus the job's absolute paths, its Ray run
    name (unique per job unless run.name is given) and W&B group/tags. `job_num`/`sweep_dir` under -m."""
    plain: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    outputs = root / "outputs"
    if plain["run"]["name"]:
        # A given name resumes that run; under -m each job still needs its own.
        run_name = plain["run"]["name"] if job_num is None else f"{plain['run']['name']}_{job_num}"
    else:
        # Unique per job, so a new job never resumes another's checkpoints.
        run_name = "_".join(output_dir.relative_to(outputs).parts) if output_dir.is_relative_to(outputs) \
            else f"{output_dir.name}_{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"
    lg = plain["logger"]
    mesh = plain["parallelism"]
    if sweep_dir is not None:
        sweep_id = "_".join(sweep_dir.relative_to(outputs / "multirun").parts) \
            if sweep_dir.is_relative_to(outputs / "multirun") else sweep_dir.name
    lg["group"] = lg["group"] or (f"sweep-{sweep_id}" if sweep_dir is not None else run_name)
    lg["tags"] = [*lg["tags"], f"tp{mesh['tp']}_dp{mesh['dp']}"]
    lg["dir"] = str(outputs)
    if lg["backend"] == "wandb":
        from tp2d_exp.tracking import resolve_wandb_mode

        lg["mode"] = resolve_wandb_mode(lg["mode"])
    storage = plain["cluster"]["storage_path"]
    if storage and not is_uri(storage):
        storage = os.path.abspath(os.path.expanduser(storage))
    if plain["data"]["path"]:  # workers may run elsewhere (another cwd, the job's working dir)
        plain["data"]["path"] = os.path.abspath(os.path.expanduser(plain["data"]["path"]))
    return {**plain, "output_dir": str(output_dir), "project_root": str(Path(__file__).resolve().parents[1]),
            "cache_dir": str(outputs / "cache"), "run_name": run_name, "multirun": job_num is not None,
            "storage_path": storage or str(outputs / "ray")}


def architecture(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The model config with architecture facts taken from a local dir's config.json when there is one."""
    out = dict(model_cfg)
    path = model_cfg.get("name_or_path")
    if path and os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
        hf = json.loads(Path(os.path.expanduser(path), "config.json").read_text())
        out.update({k: hf[k] for k in ARCH_KEYS if k in hf})
        if "num_key_value_heads" not in hf:  # absent means multi-head attention
            out["num_key_value_heads"] = out["num_attention_heads"]
        out["family"] = hf.get("model_type", out["family"])
    return out


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def data_files(data: dict[str, Any]) -> list[str]:
    """The local files of a text_files dataset: `data.path` as a file, a dir (searched recursively) or a glob."""
    path = os.path.expanduser(data["path"])
    if os.path.isdir(path):
        found = [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]
    else:
        found = glob.glob(path, recursive=True)
    return sorted(f for f in found if f.endswith((".txt", ".jsonl", ".json", ".parquet")))


def validate(cfg: dict[str, Any]) -> None:
    """Raise ConfigError for the first value that cannot work. `cfg` is the resolved config as a plain dict,
    with model architecture facts already merged from a local config.json (tp2d_exp.model.architecture)."""
    tp, dp = cfg["parallelism"]["tp"], cfg["parallelism"]["dp"]
    _require(tp >= 1, f"parallelism.tp={tp} must be a positive integer; use e.g. parallelism=tp2_dp2 or parallelism.tp=2")
    _require(dp >= 1, f"parallelism.dp={dp} must be a positive integer; use e.g. parallelism=tp2_dp2 or parallelism.dp=2")

    m = cfg["model"]
    _require(m["family"] in TP_FAMILIES,
             f"model.family={m['family']!r} has no TP plan; supported: {', '.join(TP_FAMILIES)}")
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        _require(m[key] % tp == 0,
                 f"parallelism.tp={tp} does not divide model.{key}={m[key]}; pick a tp that divides it")
    if m["name_or_path"] and m["name_or_path"].startswith((".", "/", "~")):
        _require(os.path.isdir(os.path.expanduser(m["name_or_path"])),
                 f"model.name_or_path={m['name_or_path']!r} is not a directory; "
                 "give a local HF model dir or a hub id like Qwen/Qwen2.5-0.5B")
    _require(m["pretrained"] is False or bool(m["name_or_path"]),
             "model.pretrained=true needs model.name_or_path (a hub id or local dir); or set model.pretrained=false")

    d = cfg["data"]
    _require(d["seq_length"] >= 2, f"data.seq_length={d['seq_length']} must be at least 2")
    _require(d["seq_length"] <= m["max_position_embeddings"],
             f"data.seq_length={d['seq_length']} exceeds model.max_position_embeddings="
             f"{m['max_position_embeddings']}; lower data.seq_length")
    _require(0 < d["dataset_percentage"] <= 100,
             f"data.dataset_percentage={d['dataset_percentage']} must be in (0, 100]")
    _require(d["packing"] or not d["attention_within_documents"],
             "data.attention_within_documents=true needs data.packing=true (a padded sample holds one document); "
             "set one of them")
    _require(d["source"] in ("synthetic", "text_files", "hf"),
             f"data.source={d['source']!r} is unknown; use synthetic, text_files or hf")
    if d["source"] == "text_files":
        _require(bool(d["path"]), "data.path is not set; give a file, dir or glob of .txt/.jsonl/.parquet files")
        _require(bool(data_files(d)),
                 f"data.path={d['path']!r} matches no .txt/.jsonl/.json/.parquet file; check the path")
    if d["source"] == "hf":
        _require(bool(d["hf_name"]), "data.hf_name is not set; name a Hugging Face dataset, e.g. wikitext")

    r = cfg["run"]
    _require(r["batch_size_per_gpu"] >= 1, f"run.batch_size_per_gpu={r['batch_size_per_gpu']} must be positive")
    _require(r["learning_rate"] > 0, f"run.learning_rate={r['learning_rate']} must be positive")
    _require(r["max_steps"] >= 0, f"run.max_steps={r['max_steps']} must be >= 0 (0 = no limit)")
    _require(r["num_epochs"] >= 1, f"run.num_epochs={r['num_epochs']} must be positive")
    _require(r["log_interval"] >= 1, f"run.log_interval={r['log_interval']} must be positive")
    _require(r["weight_decay"] >= 0, f"run.weight_decay={r['weight_decay']} must be >= 0")
    _require(r["activation_checkpointing"] in ("none", "selective", "full"),
             f"run.activation_checkpointing={r['activation_checkpointing']!r} must be none, selective or full")
    _require(not (r["compile"] and cfg["cluster"]["device"] == "cpu"),
             "run.compile=true needs CUDA (the CPU runs use eager mode); set run.compile=false or cluster.device=auto")
    p = cfg["parallelism"]
    _require(not p["sequence_parallel"] or d["seq_length"] % tp == 0,
             f"parallelism.sequence_parallel=true shards the sequence over tp={tp}, which does not divide "
             f"data.seq_length={d['seq_length']}; pick a seq_length divisible by tp")
    _require(r["checkpoint_every"] >= 0, f"run.checkpoint_every={r['checkpoint_every']} must be >= 0 (0 = at the end)")
    _require(r["num_to_keep"] >= 1, f"run.num_to_keep={r['num_to_keep']} must be at least 1")
    _require(r["max_failures"] >= -1, f"run.max_failures={r['max_failures']} must be >= 0 (-1 = no limit)")
    _require(r["nonfinite"] in ("stop", "skip"), f"run.nonfinite={r['nonfinite']!r} must be stop or skip")
    f = r["fault"]
    _require(f["mode"] in ("raise", "exit"), f"run.fault.mode={f['mode']!r} must be raise or exit")
    _require(0 <= f["rank"] < tp * dp, f"run.fault.rank={f['rank']} is not a worker rank; use 0..{tp * dp - 1}")
    _require(r["measure_step"] >= 0 and r["profile_steps"] >= 0,
             f"run.measure_step={r['measure_step']} and run.profile_steps={r['profile_steps']} must be >= 0 (0 = off)")
    gbs = r["global_batch_size"]
    if gbs:
        micro = r["batch_size_per_gpu"] * dp
        _require(gbs % micro == 0,
                 f"run.global_batch_size={gbs} is not a multiple of run.batch_size_per_gpu*dp={micro}; "
                 "change one of them")

    c = cfg["cluster"]
    _require(c["device"] in ("auto", "cpu", "cuda"), f"cluster.device={c['device']!r} must be auto, cpu or cuda")
    hw = cfg["hardware"]
    _require(hw["gpu"] in hw["gpus"], f"hardware.gpu={hw['gpu']!r} is not in the GPU table; "
             f"use one of {', '.join(hw['gpus'])} or add a row to conf/hardware/gpus.yaml")
    lg = cfg["logger"]
    _require(lg["backend"] in ("wandb", "none"), f"logger.backend={lg['backend']!r} must be wandb or none")
    _require(lg["mode"] in ("auto", "online", "offline", "disabled"),
             f"logger.mode={lg['mode']!r} must be auto, online, offline or disabled")
