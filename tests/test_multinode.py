"""A real two-node Ray cluster on this machine (head by `ray start --head`, token auth on, 2 CPUs per node),
attached to by run.py: bad requests fail fast with one clear line, and a sweep's jobs run side by side
(hydra/launcher=ray) with TP groups inside nodes, credentials on the workers and in no file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import ROOT, SECRETS, compose_job, files_holding, read_run, report_rows, wandb_history
from tp2d_exp.data.synthetic import documents
from tp2d_exp.testing.local_ranks import free_port
from tp2d_exp.testing.ray_cluster import LoopbackCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    with LoopbackCluster(cpus_per_node=[2, 2]) as cluster:
        yield cluster


def run_py(env: dict, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.time() - t0


def test_requests_the_cluster_cannot_serve_fail_fast_with_one_line(two_nodes, tmp_path):
    """More workers than CPUs, a layout no node split fits, GPUs the cluster lacks, a wrong token and no
    token: each stops before any worker starts, within 30 s, with one line saying what was asked, what the
    cluster has, the fix; summary.json records the failure."""
    attach = [f"cluster.address={two_nodes.address}", "logger=none"]
    no_token = {k: v for k, v in two_nodes.env.items() if k != "RAY_AUTH_TOKEN"}
    (tmp_path / "home").mkdir()  # no ~/.ray/auth_token there
    cases = {
        "too_many_workers": (two_nodes.env, ["parallelism=tp4_dp2"],
                             "parallelism: tp*dp=8 workers of 1 CPU each need 8 CPUs but the Ray cluster has "
                             "4 CPUs on 2 nodes (2+2); lower parallelism.tp/parallelism.dp"),
        "no_node_split_fits": (two_nodes.env, ["parallelism.tp=1", "parallelism.dp=3", "cluster.cpus_per_worker=1.25"],
                               "tp*dp=3 workers of 1.25 CPU each do not fit the nodes of the Ray cluster (4 CPUs on "
                               "2 nodes (2+2)): each node holds 1+1 = 2 workers"),
        "no_gpus": (two_nodes.env, ["cluster.device=cuda"],
                    "cluster.device=cuda but the Ray cluster has no GPUs; use cluster.device=auto or cpu"),
        "wrong_token": ({**two_nodes.env, "RAY_AUTH_TOKEN": "0" * 32}, [],
                        "the cluster rejected this machine's auth token; put the cluster's token"),
        "no_token": ({**no_token, "HOME": str(tmp_path / "home")}, [],
                     "token auth is on (RAY_AUTH_MODE=token) but no token was found here"),
    }
    with ThreadPoolExecutor(2) as pool:  # two at a time: the machine has two cores
        results = dict(zip(cases, pool.map(
            lambda name: run_py(cases[name][0], *attach, *cases[name][1], f"hydra.run.dir={tmp_path / name}"), cases)))
    for name, (proc, seconds) in results.items():
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1, (name, proc.stderr[-3000:])
        assert cases[name][2] in errors[0], (name, errors[0])
        assert "Traceback" not in proc.stderr
        assert seconds < 30, (name, seconds)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["status"] == "failed" and cases[name][2] in summary["error"]
    assert {n: json.loads((tmp_path / n / "summary.json").read_text())["failure"] for n in cases} == {
        "too_many_workers": "resources", "no_node_split_fits": "resources", "no_gpus": "resources",
        "wrong_token": "config", "no_token": "config"}


def test_a_node_that_cannot_see_a_path_is_named(two_nodes):
    """The shared-storage probe reads a file on every node: a path absent on both nodes is reported for
    both (on one machine every node sees the same disk, so this is how a non-shared path looks)."""
    code = ("import json; from tp2d_exp.driver import cluster; from tp2d_exp.config.schema import ClusterConfig; "
            f"cluster.connect(ClusterConfig(address='{two_nodes.address}'), 1, '.'); "
            "print(json.dumps(cluster.unseen_files({'/nonexistent/x': 'm', 'README.md': 'no such content'})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=two_nodes.env, capture_output=True, text=True,
                          timeout=120)
    unseen = json.loads(proc.stdout.splitlines()[-1])
    assert len(unseen) == 2
    assert all(paths == ["/nonexistent/x", "README.md"] for paths in unseen.values())


def test_a_sweep_runs_its_jobs_side_by_side_on_the_cluster(two_nodes, tmp_path):
    """hydra/launcher=ray: tp2_dp1 and tp1_dp2 (2 CPUs each, the default 40 steps) run at the same time on the
    2 x 2-CPU cluster, each the job the basic launcher runs (its run dir, Ray run name, summary.json); the sweep
    report follows both. Attached from a client with no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (the launcher keeps a
    loopback address on loopback itself) and with credentials (markers) in its environment, which the nodes'
    environment lacks: the workers get them, no file holds them. W&B is online, pointed at a port on 127.0.0.1
    where nothing listens: each job records offline instead. The corpus (a .txt and a .jsonl file) is
    tokenized on the cluster by Ray Data: the same store, byte for byte, as the local build. The tp2_dp2 mesh
    over both nodes (one TP group per node) is tests/test_elastic.py's."""
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in two_nodes.env
    env = {k: v for k, v in two_nodes.env.items() if k != "WANDB_MODE"}
    down = f"http://127.0.0.1:{free_port()}"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(documents(300, seed=2)) + "\n")
    (corpus / "b.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i})
                                              for i, d in enumerate(documents(300, seed=3))))
    data = ["data=text_files", f"data.path={corpus}", "data.seq_length=64", "data.val_fraction=0.02"]
    sweep = tmp_path / "sweep"
    proc, seconds = run_py({**env, **SECRETS, "WANDB_BASE_URL": down, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"},
                           "-m", "hydra/launcher=ray", "parallelism=tp2_dp1,tp1_dp2", "logger.mode=online", *data,
                           f"data.store_dir={tmp_path / 'stores'}", f"cluster.address={two_nodes.address}",
                           f"hydra.sweep.dir={sweep}", f"cluster.storage_path={tmp_path / 'ray'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads((sweep / str(n) / "summary.json").read_text()) for n in range(2)]
    assert [j["mesh"] for j in jobs] == [{"tp": 2, "dp": 1}, {"tp": 1, "dp": 2}]
    for n, job in enumerate(jobs):
        assert job["status"] == "completed" and job["steps"] == 40, job.get("error")
        assert job["final_loss"] < job["first_loss"]
        assert Path(job["checkpoint"]).parent == tmp_path / "ray" / job["run_name"]
        assert (sweep / str(n) / "run.log").exists() and (sweep / str(n) / ".hydra" / "overrides.yaml").exists()
        assert "credentials: HF_TOKEN, WANDB_API_KEY" in (sweep / str(n) / "logs" / "rank0.log").read_text()
        assert job["ray_connect_s"] >= 0 and "warnings" not in job
    assert jobs[0]["run_name"] != jobs[1]["run_name"]
    # TP inside a node: tp2_dp1's one TP group shares a node (node ids: both nodes are 127.0.0.1).
    placement = jobs[0]["placement"]
    assert placement["tp_intra_node"] is True and len({placement["node_of_rank"][r] for r in (0, 1)}) == 1

    # Side by side: each job's worker group (set-up, then its steps: "worker ... started" in rank 0's log to
    # metrics.jsonl's last write) overlaps the other's, and the sweep took less than the jobs' own times summed.
    def working(job_dir: Path) -> tuple[float, float]:
        first = next(x for x in (job_dir / "logs" / "rank0.log").read_text().splitlines() if "started" in x)
        start = datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return start, (job_dir / "metrics.jsonl").stat().st_mtime

    (start0, end0), (start1, end1) = working(sweep / "0"), working(sweep / "1")
    assert max(start0, start1) < min(end0, end1), "the jobs' worker groups did not run at the same time"
    assert seconds < jobs[0]["wall_time_s"] + jobs[1]["wall_time_s"], proc.stderr[-3000:]
    assert set(report_rows(sweep / "report.md")) == {"tp2_dp1", "tp1_dp2"}
    assert all((sweep / "plots" / f"{p}.png").stat().st_size > 0 for p in ("throughput", "loss"))

    # The store the first job built on the cluster with Ray Data (the other waited for it), as the local build.
    [on_ray] = [j["data_stores"][0] for j in jobs if not j["data_stores"][0]["reused"]]
    assert on_ray["built_by"] == "ray data"
    local = compose_job(tmp_path, [*data, f"data.store_dir={tmp_path / 'local_stores'}"]).resolved.stores[0]
    assert local.built_by == "local, 1 process"
    assert on_ray["digest"] == local.digest and on_ray["tokens"] == local.tokens > 0
    for split in ("train.bin", "heldout.bin"):
        assert (Path(on_ray["path"]) / split).read_bytes() == (Path(local.path) / split).read_bytes()

    # W&B down: each job's rank 0 said so once, within seconds of calling W&B (not W&B's 90 s), and recorded offline (every logged
    # step in the offline run's history, the placement in its config and summary).
    for n, job in enumerate(jobs):
        log = (sweep / str(n) / "logs" / "rank0.log").read_text().splitlines()
        [offline] = [x for x in log if "recording offline" in x]
        assert f"W&B init (online at {down}) failed" in offline and "wandb sync" in offline
        assert float(re.search(r"recording offline after ([0-9.]+) s", offline).group(1)) < 45, offline
        assert "offline-run-" in job["wandb_dir"]
        _, rows = read_run(sweep / str(n))
        assert [h["step"] for h in wandb_history(job["wandb_dir"])] == [r["step"] for r in rows]
    record = json.loads(subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json", jobs[0]["wandb_dir"]],
        capture_output=True, text=True, timeout=120, check=True).stdout)
    assert record["config"]["placement"] == placement and record["summary"]["placement/tp_intra_node"] is True

    # The credentials reached the workers (see tp2d_exp.credentials) but no file: not the run dirs, not the
    # nodes' Ray session dirs (runtime_env_agent.log held them when they travelled in Ray's runtime env).
    assert list(Path(two_nodes.temp_dir).glob("session_*/logs/runtime_env_agent.log"))
    roots = [tmp_path, Path(two_nodes.temp_dir), *(Path(j["wandb_dir"]) for j in jobs)]
    leaks = files_holding(roots, list(SECRETS.values()))
    assert not leaks, "\n".join(leaks)
    assert not any(v in proc.stdout + proc.stderr for v in SECRETS.values())
    print(f"sweep: {seconds:.0f}s; jobs {jobs[0]['wall_time_s']:.0f}s + {jobs[1]['wall_time_s']:.0f}s, "
          f"worker groups side by side for {min(end0, end1) - max(start0, start1):.0f}s")
