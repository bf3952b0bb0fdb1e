"""Shared fixtures: real multi-process gloo groups on 127.0.0.1, jobs composed from the real Hydra config, and
the end-to-end runs of run.py (Hydra -> Ray -> W&B offline) that several tests read, each run once a session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from tp2d_exp.config.spec import JobSpec
from tp2d_exp.testing import jobs
from tp2d_exp.testing.jobs import ROOT, compose  # noqa: F401 - the tests' names for them
from tp2d_exp.testing.local_ranks import RankPool

_pools: dict[int, RankPool] = {}


def run_distributed(fn, world: int, *args: Any, timeout: float = 1800) -> list[Any]:
    """fn(*args) on `world` gloo ranks, by rank. The ranks are kept for the whole session (one pool per
    world size), so each parallel test pays for its own work, not for starting processes; a failed call
    retires its pool and the next one starts afresh. Functions must not leave state that changes later
    calls (the tests that measure a process's own memory use tp2d_exp.testing.local_ranks.run_distributed)."""
    pool = _pools.get(world)
    if pool is None or not pool.alive:
        pool = _pools[world] = RankPool(world)
    return pool.run(fn, *args, timeout=timeout)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that run a Ray cluster of several nodes on this machine go last: under `make test` they then
    meet the end-to-end stream beside them (tests/test_end_to_end.py, tests/test_resume.py) near its end, if at
    all, rather than sharing the two cores with it from the start (the elastic test took 476 s that way, 190 s
    alone)."""
    items.sort(key=lambda item: item.path.name in ("test_elastic.py", "test_multinode.py"))


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools():
    yield
    for pool in _pools.values():
        pool.close(graceful=False)  # the session is over: nothing to hand back, so no orderly shutdown


def compose_job(tmp_path: Path, overrides: list[str], prepare: bool = True) -> JobSpec:
    """A job spec exactly as run.py builds it, its run dir under `tmp_path` (tp2d_exp.testing.jobs)."""
    return jobs.compose_job(tmp_path / "run", overrides, prepare)


@pytest.fixture
def job_factory(tmp_path: Path):
    return lambda overrides, **kw: compose_job(tmp_path, overrides, **kw)


def wandb_records(wandb_dir: str) -> list[dict]:
    """The records of an offline W&B run, read back from its binary .wandb file."""
    run_file = next(Path(wandb_dir).glob("run-*.wandb"))
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def wandb_history(wandb_dir: str) -> list[dict]:
    return [r["history"]["item"] for r in wandb_records(wandb_dir) if r.get("type") == "history"]


def wandb_summary(wandb_dir: str) -> dict:
    summary: dict = {}
    for r in wandb_records(wandb_dir):
        if r.get("type") == "summary":
            summary.update(r["summary"].get("update", {}))
    return summary


def wandb_run_id(wandb_dir: str) -> str:
    """The run id the W&B run's own record holds."""
    [run_id] = {r["run"]["run_id"] for r in wandb_records(wandb_dir) if r.get("type") == "run"}
    return run_id


# ---- run.py end to end (each costs ~20-30 s of Ray start-up here: run once, read by several tests)

GiB, MB = 2**30, 1e6


def run_py(*args: str, returncode: int | None = 0, env: dict | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """run.py in a subprocess, W&B offline (tests never reach a W&B server); asserts the exit code unless
    `returncode` is None."""
    # Ray Train's controller polls its workers every 2 s by default; tests wait for many starts and ends.
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", **(env or {})}
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if returncode is not None:
        assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def summaries(sweep: Path) -> dict[str, dict]:
    out = {}
    for job in sorted(sweep.iterdir()):
        if (job / "summary.json").exists():
            s = json.loads((job / "summary.json").read_text())
            out[f"tp{s['mesh']['tp']}_dp{s['mesh']['dp']}"] = s
    return out


def report_rows(report: Path) -> dict[str, dict[str, str]]:
    """The markdown table of report.md, by mesh."""
    lines = [x for x in report.read_text().splitlines() if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in x.strip("|").split("|")))) for x in lines[2:]]
    return {r["mesh"]: r for r in rows}


def num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


# Credentials of the end-to-end runs: markers that must appear in no file the run leaves (tests grep for them).
# Drawn per session, so that they are not in this file, which a run on an attached cluster ships to its nodes.
SECRETS = {"HF_TOKEN": f"hf_{uuid.uuid4().hex}", "WANDB_API_KEY": uuid.uuid4().hex + uuid.uuid4().hex[:8]}


def files_holding(roots: list[Path], needles: list[str]) -> list[str]:
    """Every regular file under `roots` whose bytes hold any of `needles` (binary-safe: logs, W&B's .wandb
    records, Ray's session state), as "path: needle"."""
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath, name)
                if path.is_symlink() or not path.is_file():  # sockets; links point at files walked anyway
                    continue
                data = path.read_bytes()
                found += [f"{path}: {n}" for n in needles if n.encode() in data]
    return found


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Iterator[tuple[Path, subprocess.CompletedProcess, Path]]:
    """`make run` (python run.py) with every default but the step count: 12 of its 40 steps, W&B offline,
    SECRETS in its environment; the run dir, the process and the local Ray's temp dir (its session logs)."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Unix socket paths are limited
    proc = run_py("run.max_steps=12", f"hydra.run.dir={run_dir}", env={**SECRETS, "RAY_TMPDIR": str(ray_tmp)})
    yield run_dir, proc, ray_tmp
    shutil.rmtree(ray_tmp, ignore_errors=True)


# The jobs below share these settings, so the sweep's tp1_dp2 job is the uninterrupted reference of the fault
# and resume tests, step for step: one epoch (run.max_steps=0) of 50 samples = 6 global batches of 8 (the
# last 2 samples dropped), micro-batches of 2; no held-out split (31 documents hold too few).
SMALL = ["run=debug", "run.max_steps=0", "data.synthetic_documents=31", "data.val_fraction=0", "data.seq_length=64",
         "run.batch_size_per_gpu=2", "run.global_batch_size=8"]


@pytest.fixture(scope="session")
def sweep(tmp_path_factory) -> Path:
    """`run.py -m` over tp1_dp2 and tp2_dp2 on the same global batches (one Ray job each), with the report."""
    root = tmp_path_factory.mktemp("sweep")
    run_py("-m", "+experiment=mesh_sweep_4", "parallelism=tp1_dp2,tp2_dp2", *SMALL, "run.profile_steps=1",
           "logger=none", f"hydra.sweep.dir={root}", f"cluster.storage_path={root / 'ray'}")
    return root


@pytest.fixture(scope="session")
def straight(sweep) -> Path:
    """The uninterrupted reference: the sweep's tp1_dp2 job, checkpointed at its end."""
    assert json.loads((sweep / "0" / "summary.json").read_text())["mesh"] == {"tp": 1, "dp": 2}
    return sweep / "0"


@pytest.fixture(scope="session")
def straight_2d(sweep) -> Path:
    """The same on tp2_dp2: the reference of a tp2_dp2 run's restart, bit for bit."""
    assert json.loads((sweep / "1" / "summary.json").read_text())["mesh"] == {"tp": 2, "dp": 2}
    return sweep / "1"


@pytest.fixture(scope="session")
def resumes(tmp_path_factory) -> dict[str, Any]:
    """Checkpoints on S3 (a moto_server on 127.0.0.1, alive for the session), SMALL with a checkpoint every
    2 steps (16 samples). Three calls of run.py (the first two side by side), seven worker-group starts:
    1. crashed: run.name=base on tp1_dp2 loses rank 1's process at step 5 (run.max_failures=0): it fails,
       keeping the checkpoints of steps 2 and 4 on S3. They are copied to a local dir (base_copy) and, under
       local storage, to the run names of the reruns below, batch_0 and batch_2 (each then holds the state of
       that crash).
    2. again: run.name=again on tp2_dp2, a new run on S3 that checkpoints at steps 2 and 4 and loses rank 1 at
       step 5; Ray's restart (run.max_failures=1) resumes from its checkpoint on S3 and completes; W&B offline.
    3. -m run.name=batch on tp1_dp1, local storage, over run.global_batch_size=16,4 x
       run.resume_from=null,s3://.../base/
       checkpoint_0000004 (Hydra's product: job 0 = 16 / rerun, 1 = 16 / resume_from, 2 = 4 / rerun,
       3 = 4 / resume_from):
       - jobs 0 and 2 are same-name reruns of the crash (batch_0, batch_2) with another batch size and mesh.
         Before them one byte of a shard of batch_0's latest checkpoint is flipped (only a rank's checksum
         finds that: the driver checks shard sizes), and batch_2's latest train_state.json is altered, same
         size (the driver's checksum finds it); both fall back to step 2. (That all ranks fall back together
         is tests/test_checkpoint.py's, on 4 gloo ranks.)
       - jobs 1 and 3 are new runs from the crashed (epoch-bound) run's checkpoint on S3 (run.resume_from).
    One sweep of one-worker jobs: each run.py costs a Ray start and stop, each worker a process start."""
    import s3fs

    from tp2d_exp.testing.s3_server import S3Server

    root = tmp_path_factory.mktemp("resumes")
    common = [*SMALL, "run.checkpoint_every=2", "run.num_to_keep=10", "run.measure_step=0"]
    fault = ["run.fault.fail_at_step=5", "run.fault.rank=1", "run.fault.mode=exit"]
    with S3Server() as s3:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint}, key="testing", secret="testing",
                               skip_instance_cache=True)
        on_s3, ray = f"cluster.storage_path={s3.uri('ray')}", f"{s3.bucket}/ray"
        # 1 and 2 side by side (two local Rays, two run names): most of their time is Ray starting workers.
        with ThreadPoolExecutor(2) as pool:
            crashing = pool.submit(run_py, *common, "parallelism=tp1_dp2", "run.name=base", on_s3, *fault,
                                   "run.max_failures=0", "logger=none", f"hydra.run.dir={root / 'crashed'}",
                                   env=s3.env, returncode=1)
            pool.submit(run_py, *common, "parallelism=tp2_dp2", "run.name=again", on_s3, *fault, "run.max_failures=1",
                        "logger.mode=offline", f"hydra.run.dir={root / 'again'}", env=s3.env).result()
            crashed = crashing.result()
        kept = sorted(p.split("/")[-2] for p in fs.glob(f"{ray}/base/checkpoint_0*/commit.json"))
        for ckpt in kept:
            fs.get(f"{ray}/base/{ckpt}/", str(root / "base_copy" / ckpt) + "/", recursive=True)
        for name in ("batch_0", "batch_2"):
            shutil.copytree(root / "base_copy", root / "ray" / name)
        latest = kept[-1]
        shard = root / "ray" / "batch_0" / latest / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        state = root / "ray" / "batch_2" / latest / "train_state.json"
        state.write_bytes(state.read_bytes().replace(b'"samples_consumed": 32', b'"samples_consumed": 24'))
        batches = run_py("-m", *common, "parallelism=tp1_dp1", "logger=none", "run.name=batch",
                         f"cluster.storage_path={root / 'ray'}",
                         "run.global_batch_size=16,4", f"run.resume_from=null,'{s3.uri(f'ray/base/{latest}')}'",
                         f"hydra.sweep.dir={root / 'batches'}", env=s3.env)
        yield {"root": root, "s3": s3, "fs": fs, "crashed": root / "crashed", "crashed_stderr": crashed.stderr,
               "kept": kept, "again": root / "again", "base_copy": root / "base_copy",
               "batches_stderr": batches.stderr}
