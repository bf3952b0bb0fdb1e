"""Config schema (one dataclass per Hydra group) and validation that runs before any worker starts.

The schemas are registered in Hydra's ConfigStore as the base of every group file, so a misspelled key or
a wrong type fails at compose time. `validate` then checks what types cannot: values that do not fit the
model, the mesh or the files on disk. Each failure is one line that names the key and the fix.
"""

from __future__ import annotations

import glob
import json
import os
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
    synthetic_documents: int = 3000


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
    log_interval: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end of training
    num_to_keep: int = 2
    max_failures: int = 0
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


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # null: start Ray locally; "auto" or "ray://host:port" attaches
    device: str = "auto"  # auto: CUDA + NCCL when the cluster has GPUs, else CPU + gloo
    cpus_per_worker: float = 1.0
    storage_path: Optional[str] = None  # Ray storage (checkpoints); null: <project>/outputs/ray
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
    lg["group"] = lg["group"] or (f"sweep-{sweep_dir.name}" if sweep_dir else run_name)
    lg["tags"] = [*lg["tags"], f"tp{mesh['tp']}_dp{mesh['dp']}"]
    lg["dir"] = str(outputs)
    if lg["backend"] == "wandb":
        from tp2d_exp.tracking import resolve_wandb_mode

        lg["mode"] = resolve_wandb_mode(lg["mode"])
    storage = plain["cluster"]["storage_path"]
    return {**plain, "output_dir": str(output_dir), "project_root": str(Path(__file__).resolve().parents[1]),
            "cache_dir": str(outputs / "cache"), "run_name": run_name, "multirun": job_num is not None,
            "storage_path": os.path.abspath(os.path.expanduser(storage)) if storage else str(outputs / "ray")}


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
