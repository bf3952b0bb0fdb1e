"""Driver side: prepare what workers need, check the cluster, run the Ray TorchTrainer, write summary.json.

Everything a worker needs travels in one plain dict (`worker_config`); workers never see Hydra objects.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tp2d_exp import cluster
from tp2d_exp.config import ConfigError

log = logging.getLogger(__name__)


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


class ProgressBar(threading.Thread):
    """Follows rank 0's metrics.jsonl on the driver, so the console shows one clean bar whatever Ray logs."""

    def __init__(self, metrics_path: Path, total_steps: int):
        super().__init__(daemon=True)
        self.path, self.total = metrics_path, total_steps
        self.stop = threading.Event()

    def run(self) -> None:
        from tqdm import tqdm

        bar, offset = None, 0
        while True:
            stopping = self.stop.wait(0.5)
            if self.path.exists():
                with open(self.path) as f:
                    f.seek(offset)
                    for line in f.readlines():
                        if not line.endswith("\n"):
                            break
                        offset += len(line.encode())
                        row = json.loads(line)
                        if bar is None:  # created at the first step, so rate and ETA leave out start-up
                            bar = tqdm(total=self.total, initial=row["step"] - 1, desc="train", unit="step",
                                       dynamic_ncols=True, file=sys.stderr, disable=None)
                        bar.update(row["step"] - bar.n)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if stopping:
                break
        if bar is not None:
            bar.close()


def launch(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one training job through Ray Train and return its summary (also written to summary.json)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from tp2d_exp.train import train_worker

    out = Path(cfg["output_dir"])
    world = cfg["parallelism"]["tp"] * cfg["parallelism"]["dp"]
    summary: dict[str, Any] = {
        "status": "failed", "run_name": cfg["run_name"], "mesh": {k: cfg["parallelism"][k] for k in ("tp", "dp")}, "world_size": world,
        "global_batch_size": cfg["global_batch_size"], "total_steps": cfg["total_steps"],
        "model_dir": cfg["model_dir"], "tokenizer_dir": cfg["tokenizer_dir"], "checkpoint": None,
    }
    t0 = time.time()
    tp_warning = None
    bar = ProgressBar(out / "metrics.jsonl", cfg["total_steps"])
    gave_up = False  # a worker failed once more than run.max_failures allows
    try:
        connect_s = cluster.connect(cfg["cluster"], world, cfg["project_root"])
        summary["ray_connect_s"] = round(cfg.get("ray_connect_s", connect_s), 2)  # attached in prepare, else here
        capacity = cluster.check_resources(cfg)
        use_gpu = capacity.use_gpu
        if cfg["run"]["compile"] and not use_gpu:
            raise ConfigError("run.compile=true needs CUDA but the Ray cluster has no GPU; set run.compile=false")
        cluster.check_shared_paths(cfg)
        log.info("cluster checked after %.1fs", time.time() - t0)
        tp_warning = cluster.before_launch(cfg, capacity)
        if tp_warning:
            summary["warnings"] = [tp_warning]
        summary["device"] = "cuda" if use_gpu else "cpu"
        env = cluster.worker_env(cfg)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=cfg,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=world, use_gpu=use_gpu,
                resources_per_worker=None if use_gpu else {"CPU": cfg["cluster"]["cpus_per_worker"]}),
            run_config=ray.train.RunConfig(
                name=cfg["run_name"], storage_path=cfg["storage_path"],
                # A start-up that times out (cluster.resource_wait_s) is retried no more than a failed run:
                # V2's default is to retry it forever.
                failure_config=ray.train.FailureConfig(max_failures=cfg["run"]["max_failures"],
                                                       controller_failure_limit=cfg["run"]["max_failures"]),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg["run"]["num_to_keep"]),
                worker_runtime_env={"env_vars": env}),
        )
        if sys.stderr.isatty():
            print(f"starting {world} Ray workers (tp{cfg['parallelism']['tp']} x dp{cfg['parallelism']['dp']}, "
                  f"{summary['device']}); logs in {out}", file=sys.stderr)
        bar.start()
        result = trainer.fit()
        summary["status"] = "completed"
        log.info("training finished after %.1fs", time.time() - t0)
        summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the summary must say why a run failed
        summary["error"] = cluster.startup_error(e, cfg) or _root_cause(e)
        gave_up = getattr(e, "worker_failures", None) is not None
    finally:
        if bar.is_alive():
            bar.stop.set()
            bar.join()
        summary["wall_time_s"] = round(time.time() - t0, 2)
        summary.update(_from_worker_files(out))
        placement_warning = _placement_warning(summary)
        if placement_warning and not tp_warning:  # said once: before launch when it was predictable
            log.warning("%s", placement_warning)
            summary["warnings"] = [placement_warning]
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
                           useful_tokens_per_s=_steady_mean(rows, "useful_tokens_per_s"),
                           tokens_per_s_per_device=_steady_mean(rows, "tokens_per_s_per_device"),
                           step_time_s=_steady_mean(rows, "step_time_s"))
            if "mfu" in last:  # GPUs listed in the hardware table only
                summary["mfu"] = _steady_mean(rows, "mfu")
    worker = out / "worker.json"
    if worker.exists():
        summary.update(json.loads(worker.read_text()))
    return summary


def _placement_warning(summary: dict[str, Any]) -> str | None:
    """A warning when the placement the workers reported (worker.json) has a TP group spanning nodes."""
    from tp2d_exp.mesh import Placement

    p = summary.get("placement")
    return Placement(tuple(p["node_of_rank"]), tuple(map(tuple, p["tp_groups"]))).warning() if p else None


def _steady_mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean over logged windows after the first (which includes start-up and the first step), leaving out
    instrumented steps (comm counter, profiler: tp2d_exp.measure)."""
    steady = [r for r in rows[1:] if not r.get("instrumented")] or rows[1:] or rows
    return sum(r[key] for r in steady) / len(steady)


def prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """Resolve, validate and prepare a job on the driver, before any worker starts: architecture facts,
    tokenizer and model dirs, the tokenized corpus (cached for workers) and the step plan."""
    from tp2d_exp.config import architecture, validate

    cfg = {**cfg, "model": architecture(cfg["model"])}
    validate(cfg)  # before the heavy imports below, so a bad value fails in about a second
    cluster.check_config(cfg["cluster"])
    if cfg["cluster"]["address"]:  # an existing cluster: can it serve tp*dp workers? Before the heavy work below
        cfg["ray_connect_s"] = cluster.connect(cfg["cluster"], cfg["parallelism"]["tp"] * cfg["parallelism"]["dp"],
                                               cfg["project_root"])
        cluster.check_resources(cfg)

    from tp2d_exp.data import prepare_dataset
    from tp2d_exp.model import model_source_dir
    from tp2d_exp.tokenizer import load_tokenizer, project_bpe_dir

    m = cfg["model"]
    if m["tokenizer"]:
        tokenizer_dir = m["tokenizer"]
    elif m["name_or_path"]:
        tokenizer_dir = m["name_or_path"]
    else:
        # The project's BPE for an architecture built from scratch; a corpus this small supports a few
        # thousand merges, so larger vocabularies (a 0.5B architecture's 151936) keep unused embedding rows.
        tokenizer_dir = project_bpe_dir(cfg["cache_dir"], min(m["vocab_size"], 8192))
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
