"""The job spec: what the user asked for (the schema sections) plus what the driver derived from it
(`Resolved`), frozen, built once on the driver and pickled to every worker, read by attribute everywhere.

    spec = build_spec(composed_cfg, JobContext(...))    # compose time: names, paths, architecture, batch size
    spec = prepare(spec)                                 # driver: tokenizer, corpus, steps (tp2d_exp.driver)

A section holds the user's value; `resolved` holds the effective one wherever the two can differ (a
`run.global_batch_size` of 0 becomes a number, `cluster.storage_path=null` a path, `logger.mode=auto` online
or offline, the architecture keys whatever a local model dir's config.json says). Past validation, code reads
the effective value only.
"""

from __future__ import annotations

import enum
import glob
import json
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from tp2d_exp.config.errors import ConfigError, first_line
from tp2d_exp.config.parallel_dims import ParallelDims
from tp2d_exp.config.schedule import Schedule
from tp2d_exp.config.schema import (Config, DataConfig, DataSource, Device, Family, LoggerBackend, ModelConfig,
                                    WandbMode)
from tp2d_exp.records import ResizeRecord, StoreRecord
from tp2d_exp.storage import is_uri

# The architecture facts a transformers config takes as keyword arguments (and a checkpoint's config records).
ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
             "rope_theta", "rms_norm_eps")


@dataclass(frozen=True)
class Architecture:
    """The effective model architecture: the `model` keys, overridden by a local model dir's config.json."""

    family: Family
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    attention_bias: Optional[bool] = None  # None: the family's default

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of transformers' AutoConfig.for_model."""
        kwargs = {k: getattr(self, k) for k in ARCH_KEYS}
        if self.attention_bias is not None:
            kwargs["attention_bias"] = self.attention_bias
        return kwargs

    @classmethod
    def of(cls, model: ModelConfig) -> "Architecture":
        """The architecture of a model config; a local name_or_path's config.json (when there is one) wins."""
        values = {k: getattr(model, k) for k in (*ARCH_KEYS, "family", "attention_bias")}
        config = Path(os.path.expanduser(model.name_or_path or ""), "config.json")
        if model.name_or_path and config.is_file():
            hf = _read_config_json(config, model.name_or_path)
            if "rope_theta" not in hf and "rope_theta" in (hf.get("rope_parameters") or {}):
                hf["rope_theta"] = hf["rope_parameters"]["rope_theta"]  # where transformers 5 writes it
            values.update({k: hf[k] for k in ARCH_KEYS if k in hf})
            if "num_key_value_heads" not in hf:  # absent means multi-head attention
                values["num_key_value_heads"] = values["num_attention_heads"]
            model_type = hf.get("model_type", str(model.family))
            if model_type not in Family.__members__:
                raise ConfigError(f"model.name_or_path={model.name_or_path!r} is a {model_type!r} model "
                                  f"(config.json model_type), a family without TP styles here; supported: "
                                  f"{', '.join(Family)}")
            values["family"] = Family(model_type)
        return cls(**values)


def _read_config_json(path: Path, name_or_path: str) -> dict[str, Any]:
    """A local model dir's config.json, its architecture facts of the types the `model` keys have."""
    where = f"model.name_or_path={name_or_path!r}: {path.name}"
    try:
        hf = json.loads(path.read_bytes())
    except ValueError as e:  # not UTF-8 or not JSON
        raise ConfigError(f"{where} is not JSON ({first_line(e)}); give a Hugging Face model dir") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{where} holds a {type(hf).__name__}, not a JSON object; give a Hugging Face model dir")
    kinds = typing.get_type_hints(Architecture)
    for key in ARCH_KEYS:
        kind = kinds[key]  # JSON gives int, float, bool exactly (a float key may hold an int)
        if key in hf and not (type(hf[key]) is kind or (kind is float and type(hf[key]) is int)):
            raise ConfigError(f"{where} has {key}={hf[key]!r}, not a {kind.__name__}; fix the file")
    return hf


@dataclass(frozen=True)
class WandbSetup:
    """Where rank 0's W&B run goes, with the logger's defaults resolved (None in Resolved when W&B is off)."""

    mode: WandbMode  # online or offline
    group: str  # the sweep id under -m, else the run name, unless logger.group is set
    tags: tuple[str, ...]  # logger.tags plus the mesh
    dir: str


@dataclass(frozen=True)
class Resolved:
    """Effective values the driver derived. The first block is known at compose time; `prepare` (tokenizer
    and corpus) fills the second and the launcher (cluster) the last, all before any worker starts."""

    run_name: str  # Ray run name: run.name, else unique per job (a job never resumes another's checkpoints)
    output_dir: str  # the job's run dir (Hydra's)
    project_root: str  # this checkout: the code workers import
    cache_dir: str  # tokenizer, tiny model config and token caches
    storage_path: str  # Ray storage: cluster.storage_path, else <outputs>/ray
    arch: Architecture
    global_batch_size: int
    data_files: tuple[str, ...]  # text_files: the files data.path names (absolute)
    wandb: Optional[WandbSetup]
    # prepare (data/tokenizer stage)
    tokenizer_dir: str = ""
    model_dir: str = ""  # a local dir with the HF config + tokenizer (or the pretrained model's id/dir)
    stores: tuple[StoreRecord, ...] = ()  # one token store per source
    num_samples: int = 0
    data_digest: str = ""  # content digest of the token data (a checkpoint records it)
    num_heldout_samples: int = 0  # samples of the held-out store (data.val_fraction); 0: no evaluation
    # The run's schedule in samples: a same-name rerun's is its checkpoint's, else this job's settings
    # converted with its global batch size (tp2d_exp.config.schedule).
    schedule: Optional[Schedule] = None
    start_samples: int = 0  # samples consumed at the checkpoint the job starts from
    resume_checkpoint: Optional[str] = None  # run.resume_from resolved to a checkpoint dir
    # scripts/evaluate.py: the workers load resume_checkpoint, score the held-out set and write eval.json
    # (tp2d_exp.driver.evaluate); nothing is trained or saved.
    evaluate_only: bool = False
    # launch (cluster stage)
    device: Optional[Device] = None  # cpu or cuda
    resize: Optional[ResizeRecord] = None  # cluster.elastic: the change of mesh this start of the workers makes


@dataclass(frozen=True)
class JobSpec(Config):
    resolved: Resolved = field(kw_only=True)

    @property
    def dims(self) -> ParallelDims:
        return self.parallelism

    @property
    def arch(self) -> Architecture:
        return self.resolved.arch

    @property
    def accumulation_steps(self) -> int:
        return self.resolved.global_batch_size // (self.run.batch_size_per_gpu * self.dims.dp)

    @property
    def steps_left(self) -> int:
        """Optimizer steps this job is expected to train (the data may end a step sooner)."""
        r = self.resolved
        return r.schedule.steps_left(r.start_samples, r.global_batch_size) if r.schedule else 0

    def with_resolved(self, **changes: Any) -> "JobSpec":
        return replace(self, resolved=replace(self.resolved, **changes))

    def with_dp(self, dp: int) -> "JobSpec":
        """The job on another dp, tp and the global batch kept (an elastic resize: tp2d_exp.driver.elastic)."""
        return replace(self, parallelism=replace(self.parallelism, dp=dp))


@dataclass(frozen=True)
class JobContext:
    """Where Hydra put this job: the launch dir (outputs/ lives under it), the run dir, and under -m the job's
    number and the sweep dir."""

    root: Path
    output_dir: Path
    job_num: Optional[int] = None
    sweep_dir: Optional[Path] = None


def resolve_wandb_mode(mode: WandbMode) -> WandbMode:
    """auto: online when credentials exist (WANDB_API_KEY or a netrc entry), else offline; WANDB_MODE wins."""
    if mode is not WandbMode.auto:
        return mode
    env = {"dryrun": "offline", "run": "online"}.get(os.environ.get("WANDB_MODE", ""), os.environ.get("WANDB_MODE"))
    if env in WandbMode.__members__:  # W&B's own aliases mapped onto its modes
        return WandbMode(env)
    if os.environ.get("WANDB_API_KEY"):
        return WandbMode.online
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return WandbMode.online
    return WandbMode.offline


def run_name(name: Optional[str], ctx: JobContext) -> str:
    """The job's Ray run name: `run.name` (it resumes that run; under -m each job still gets its own), else one
    unique per job, so that a new job never resumes another's checkpoints."""
    if name:
        return name if ctx.job_num is None else f"{name}_{ctx.job_num}"
    outputs = ctx.root / "outputs"
    if ctx.output_dir.is_relative_to(outputs):
        return "_".join(ctx.output_dir.relative_to(outputs).parts)
    return f"{ctx.output_dir.name}_{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"


def _wandb(config: Config, ctx: JobContext, run_name: str, outputs: Path) -> Optional[WandbSetup]:
    lg = config.logger
    mode = resolve_wandb_mode(lg.mode)
    if lg.backend is LoggerBackend.none or mode is WandbMode.disabled:
        return None
    if lg.group:
        group = lg.group
    elif ctx.sweep_dir is not None:
        sweeps = outputs / "multirun"
        group = "sweep-" + ("_".join(ctx.sweep_dir.relative_to(sweeps).parts)
                            if ctx.sweep_dir.is_relative_to(sweeps) else ctx.sweep_dir.name)
    else:
        group = run_name
    return WandbSetup(mode=mode, group=group, tags=(*lg.tags, config.parallelism.name), dir=str(outputs))


def text_files(path: str) -> list[str]:
    """The files a text_files `data.path` names: a file, a dir (searched recursively) or a glob; on local disk
    or object storage (`s3://bucket/corpus/`, through fsspec)."""
    suffixes = (".txt", ".jsonl", ".json", ".parquet")
    if is_uri(path):
        from tp2d_exp.storage import filesystem

        fs, p = filesystem(path)
        try:
            found = fs.find(p) if fs.isdir(p) else fs.glob(p)
        except (OSError, ValueError):  # an unreachable store or a malformed URI: validation names the key
            return []
        protocol = path.split("://", 1)[0]
        return sorted(f"{protocol}://{f}" for f in found if f.endswith(suffixes))
    if os.path.isdir(path):
        found = [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]
    else:
        found = glob.glob(path, recursive=True)
    return sorted(f for f in found if f.endswith(suffixes))


def _absolute(path: str) -> str:
    """Workers may run elsewhere (another cwd, the job's working dir), so local paths travel absolute."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def build_spec(cfg: DictConfig | Config, ctx: JobContext) -> JobSpec:
    """The job spec of a composed config: everything known before touching the corpus or the cluster."""
    config: Config = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg  # type: ignore[assignment]
    data: DataConfig = config.data
    if data.path:
        data = replace(data, path=_absolute(data.path))
    if data.mixture:
        data = replace(data, mixture=[replace(m, path=_absolute(m.path)) if m.path else m for m in data.mixture])
    outputs = ctx.root / "outputs"
    name = run_name(config.run.name, ctx)
    storage = config.cluster.storage_path
    gbs = config.run.global_batch_size or config.run.batch_size_per_gpu * config.parallelism.dp
    resolved = Resolved(
        run_name=name, output_dir=str(ctx.output_dir), project_root=str(Path(__file__).resolve().parents[2]),
        cache_dir=str(outputs / "cache"),
        storage_path=(storage if is_uri(storage) else _absolute(storage)) if storage else str(outputs / "ray"),
        arch=Architecture.of(config.model), global_batch_size=gbs,
        data_files=tuple(text_files(data.path)) if data.source is DataSource.text_files and data.path else (),
        wandb=_wandb(config, ctx, name, outputs))
    sections = {f.name: getattr(config, f.name) for f in fields(Config)}
    return JobSpec(**{**sections, "data": data}, resolved=resolved)


def flat_config(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass tree as {"section.key": value}, enums as their values: the job's W&B config."""
    out: dict[str, Any] = {}
    items = ((f.name, getattr(obj, f.name)) for f in fields(obj)) if is_dataclass(obj) else obj.items()
    for key, value in items:
        name = f"{prefix}{key}"
        if is_dataclass(value) or isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, enum.Enum):
            out[name] = value.value
        elif isinstance(value, tuple):
            out[name] = list(value)
        else:
            out[name] = value
    return out
