"""Driver side: prepare what workers need, check the cluster, run the Ray TorchTrainer, write summary.json.

Everything a worker needs travels in one plain dict (`worker_config`); workers never see Hydra objects.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tp2d_exp.config import ConfigError

log = logging.getLogger(__name__)

# Forwarded to workers explicitly: Ray does not pass the driver's environment to workers.
FORWARDED_ENV = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_ENTITY", "HF_HOME", "HF_HUB_OFFLINE",
                 "HF_DATASETS_OFFLINE", "HF_TOKEN", "TRANSFORMERS_OFFLINE")


def plan_steps(cfg: dict[str, Any], num_samples: int) -> dict[str, int]:
    """Global batch, steps per epoch and total optimizer steps, known before any worker starts."""
    run, dp = cfg["run"], cfg["parallelism"]["dp"]
    gbs = run["global_batch_size"] or run["batch_size_per_gpu"] * dp
    per_epoch = num_samples // gbs
    if per_epoch == 0:
        raise ConfigError(f"the corpus has {num_samples} samples of data.seq_length={cfg['data']['seq_length']}, "
                          f"fewer than one global batch ({gbs}); lower run.batch_size_per_gpu or add data")
    total = per_epoch * run["num_epochs"]
    if run["max_steps"]:
        total = min(total, run["max_steps"])
    return {"global_batch_size": gbs, "steps_per_epoch": per_epoch, "total_steps": total}


def init_ray(cluster: dict[str, Any], world_size: int, log_dir: str) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": cluster["verbose"],
                              "logging_level": logging.INFO if cluster["verbose"] else logging.ERROR}
    if cluster["address"]:
        kwargs["address"] = cluster["address"]
    else:
        # A local start: loopback only, and enough logical CPUs for tp*dp workers even on a small machine
        # (the workers then share cores; throughput drops, the math does not).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        kwargs["num_cpus"] = max(os.cpu_count() or 1, math.ceil(world_size * cluster["cpus_per_worker"]))
        kwargs["_node_ip_address"] = "127.0.0.1"
    ray.init(**kwargs)


def check_resources(cluster: dict[str, Any], world_size: int) -> bool:
    """Decide CPU or GPU and fail fast, with the numbers, when the cluster cannot hold tp*dp workers."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), res.get("CPU", 0)
    device = cluster["device"]
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if use_gpu and world_size > gpus:
        raise ConfigError(f"parallelism: tp*dp={world_size} workers need {world_size} GPUs but the Ray cluster has "
                          f"{gpus}; lower parallelism.tp/parallelism.dp or add GPU nodes")
    if use_gpu and world_size < gpus:
        log.warning("using %d of the cluster's %d GPUs", world_size, gpus)
    need_cpus = 0 if use_gpu else world_size * cluster["cpus_per_worker"]
    if need_cpus > cpus:
        raise ConfigError(f"parallelism: tp*dp={world_size} CPU workers need {need_cpus:g} CPUs but the Ray cluster "
                          f"has {cpus:g}; lower parallelism.tp/parallelism.dp or cluster.cpus_per_worker")
    return use_gpu


class ProgressBar(threading.Thread):
    """Follows rank 0's metrics.jsonl on the driver, so the console shows one clean bar whatever Ray logs."""

    def __init__(self, metrics_path: Path, total_steps: int):
        super().__init__(daemon=True)
        self.path, self.total = metrics_path, total_steps
        self.stop = threading.Event()

    def run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=None if sys.stderr.isatty() else True)
        offset = 0
        while True:
            stopping = self.stop.wait(0.5)
            if self.path.exists():
                with open(self.path) as f:
                    f.seek(offset)
                    for line in f.readlines():
                        if line.endswith("\n"):
                            row = json.loads(line)
                            offset += len(line.encode())
                            bar.update(row["step"] - bar.n)
                            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if stopping:
                break
        bar.close()


def launch(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one training job through Ray Train and return its summary (also written to summary.json)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from tp2d_exp.train import train_worker

    out = Path(cfg["output_dir"])
    world = cfg["parallelism"]["tp"] * cfg["parallelism"]["dp"]
    summary: dict[str, Any] = {
        "status": "failed", "run_name": cfg["run_name"], "mesh": dict(cfg["parallelism"]), "world_size": world,
        "global_batch_size": cfg["global_batch_size"], "total_steps": cfg["total_steps"],
        "model_dir": cfg["model_dir"], "tokenizer_dir": cfg["tokenizer_dir"], "checkpoint": None,
    }
    t0 = time.time()
    bar = ProgressBar(out / "metrics.jsonl", cfg["total_steps"])
    gave_up = False  # a worker failed once more than run.max_failures allows
    try:
        init_ray(cfg["cluster"], world, str(out))
        log.info("ray ready after %.1fs", time.time() - t0)
        use_gpu = check_resources(cfg["cluster"], world)
        summary["device"] = "cuda" if use_gpu else "cpu"
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [cfg["project_root"], os.environ.get("PYTHONPATH")]))
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=cfg,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=world, use_gpu=use_gpu,
                resources_per_worker=None if use_gpu else {"CPU": cfg["cluster"]["cpus_per_worker"]}),
            run_config=ray.train.RunConfig(
                name=cfg["run_name"], storage_path=cfg["storage_path"],
                failure_config=ray.train.FailureConfig(max_failures=cfg["run"]["max_failures"]),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg["run"]["num_to_keep"]),
                worker_runtime_env={"env_vars": env}),
        )
        bar.start()
        result = trainer.fit()
        summary["status"] = "completed"
        log.info("training finished after %.1fs", time.time() - t0)
        summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the summary must say why a run failed
        summary["error"] = _root_cause(e)
        gave_up = getattr(e, "worker_failures", None) is not None
    finally:
        if bar.is_alive():
            bar.stop.set()
            bar.join()
        summary["wall_time_s"] = round(time.time() - t0, 2)
        summary.update(_from_worker_files(out))
        if gave_up:
            summary["error"] += (f" (gave up after {summary.get('restarts', 0)} restart(s): "
                                 f"run.max_failures={cfg['run']['max_failures']})")
        if summary["status"] == "failed":
            log.error("training failed: %s", summary.get("error"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _root_cause(e: BaseException) -> str:
    """The innermost worker error as one line, not Ray's wrapper."""
    while True:
        inner = getattr(e, "worker_failures", None) or {}
        # A lost worker (its process died or stopped answering) is the cause; the other ranks' errors are
        # broken collectives that follow from it.
        lost = [(rank, f.health_check_failure) for rank, f in inner.items() if hasattr(f, "health_check_failure")]
        if lost:
            rank, failure = lost[0]
            return f"{type(failure).__name__}: worker rank {rank} was lost (its process died or stopped answering)"
        if inner:
            e = next(iter(inner.values()))
            continue
        if e.__cause__ is not None:
            e = e.__cause__
            continue
        break
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def _from_worker_files(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            last = rows[-1]
            summary.update(steps=last["step"], final_loss=last["loss"],
                           first_loss=rows[0]["loss"],
                           tokens_per_s=_steady_mean(rows, "tokens_per_s"),
                           useful_tokens_per_s=_steady_mean(rows, "useful_tokens_per_s"))
    worker = out / "worker.json"
    if worker.exists():
        summary.update(json.loads(worker.read_text()))
    return summary


def _steady_mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean over logged windows after the first (which includes start-up and the first step)."""
    steady = rows[1:] or rows
    return sum(r[key] for r in steady) / len(steady)


def prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """Resolve, validate and prepare a job on the driver, before any worker starts: architecture facts,
    tokenizer and model dirs, the tokenized corpus (cached for workers) and the step plan."""
    from tp2d_exp.config import architecture, validate

    cfg = {**cfg, "model": architecture(cfg["model"])}
    validate(cfg)  # before the heavy imports below, so a bad value fails in about a second

    from tp2d_exp.data import prepare_dataset
    from tp2d_exp.model import model_source_dir
    from tp2d_exp.tokenizer import load_tokenizer, project_bpe_dir

    m = cfg["model"]
    if m["tokenizer"]:
        tokenizer_dir = m["tokenizer"]
    elif m["name_or_path"]:
        tokenizer_dir = m["name_or_path"]
    else:
        tokenizer_dir = project_bpe_dir(cfg["cache_dir"], m["vocab_size"])
    try:
        vocab = len(load_tokenizer(tokenizer_dir))
    except OSError as e:
        raise ConfigError(f"tokenizer {tokenizer_dir!r} (model.tokenizer or model.name_or_path) could not be "
                          f"loaded: {_first_line(e)}; give a local dir, or check the network / HF_TOKEN") from e
    if vocab > m["vocab_size"]:
        raise ConfigError(f"model.vocab_size={m['vocab_size']} is smaller than the tokenizer's {vocab} tokens; "
                          f"set model.vocab_size>={vocab}")
    try:
        dataset = prepare_dataset(cfg["data"], tokenizer_dir, cfg["cache_dir"])
    except (OSError, ConnectionError) as e:
        raise ConfigError(f"data={cfg['data']['name']} could not be loaded: {_first_line(e)}; check data.path, "
                          "or the network / HF cache for hub datasets") from e
    if len(dataset) == 0:
        raise ConfigError(f"the corpus yields no sample of data.seq_length={cfg['data']['seq_length']}; "
                          "check data.path/data.source or lower data.seq_length")
    cfg.update(plan_steps(cfg, len(dataset)), tokenizer_dir=tokenizer_dir, num_samples=len(dataset),
               model_dir=model_source_dir(m, tokenizer_dir, cfg["cache_dir"]))
    from tp2d_exp.checkpoint import resume_source

    cfg["resume_checkpoint"] = resume_source(cfg)
    return cfg
