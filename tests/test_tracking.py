"""Tracker isolation against real W&B: a server that cannot be reached or refuses the key, and W&B dying
mid-run, cost seconds and the run records offline; a dir that cannot be created and a disk too full switch
W&B off. Each is reported once and the metrics still land in metrics.jsonl. A restarted worker group
resumes the same W&B run."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import files_holding, wandb_records, wandb_run_id
from tp2d_exp.config.schema import LoggerConfig, WandbMode
from tp2d_exp.config.spec import WandbSetup
from tp2d_exp.records import StepRow
from tp2d_exp.train.tracking import Tracker


def logger_cfg(tmp_path: Path, mode: str = "offline", dir: str | None = None,
               min_free_mb: int = 0) -> tuple[LoggerConfig, WandbSetup]:
    return (LoggerConfig(project="tp2d_exp_tests", min_free_mb=min_free_mb),
            WandbSetup(mode=WandbMode(mode), group="g", tags=(), dir=dir or str(tmp_path / "outputs")))


def row(step: int) -> StepRow:
    return StepRow(step=step, epoch=0, loss=10.0 - step, lr=1e-3, grad_norm=1.0, samples_consumed=4 * step,
                   skipped_steps=0, tokens_per_s=1.0, useful_tokens_per_s=1.0, tokens_per_s_per_device=1.0,
                   step_time_s=1.0)


def train_a_little(tmp_path: Path, lg: tuple[LoggerConfig, WandbSetup]) -> tuple[Tracker, list[dict]]:
    with Tracker(str(tmp_path / "run"), *lg, "run", {"lr": 1e-3}) as tracker:
        for step in (1, 2, 3):
            tracker.log(row(step))
        tracker.summary({"loss": 7.0})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return tracker, rows


def w_and_b_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tp2d_exp.train.tracking"]


def loopback_port() -> int:
    """A port on 127.0.0.1 where nobody listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_recorded_offline(tracker: Tracker, caplog, what: str, steps: list[int]) -> list[dict]:
    """One warning, naming what failed and the offline record; that record (W&B's own file, read back by
    `wandb leet inspect`) holds `steps` under the job's W&B run id. Its records."""
    [warning] = w_and_b_warnings(caplog)
    assert what in warning and re.search(rf"recording offline after [0-9.]+ s in {re.escape(tracker.wandb_dir)}",
                                         warning), warning
    assert Path(tracker.wandb_dir).name.startswith("offline-run-")
    records = wandb_records(tracker.wandb_dir)  # read once: each read is a `wandb` CLI call
    assert [r["history"]["item"]["_step"] for r in records if r.get("type") == "history"] == steps
    run_id = (tracker.metrics_path.parent / "wandb_id").read_text()
    assert {r["run"]["run_id"] for r in records if r.get("type") == "run"} == {run_id}
    return records


@pytest.mark.slow  # waits out the init timeout (5 s) by design
def test_unreachable_server_with_a_fake_key_goes_offline_in_seconds(tmp_path, monkeypatch, caplog):
    """W&B at a loopback port where nothing listens, a fake key: init gives up after INIT_TIMEOUT_S (W&B's own
    default waits 90 s) and the run records offline, for `wandb sync` to upload later."""
    url, key = f"http://127.0.0.1:{loopback_port()}", uuid.uuid4().hex + uuid.uuid4().hex[:8]
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", key)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="tp2d_exp.train.tracking"):
        tracker = Tracker(str(tmp_path / "run"), *logger_cfg(tmp_path, mode="online"), "run", {"lr": 1e-3})
        switched_s = time.perf_counter() - t0
        with tracker:
            for step in (1, 2, 3):
                tracker.log(row(step))
            tracker.summary({"loss": 7.0})
    print(f"init + switch to offline: {switched_s:.1f}s")
    # Bounded, where W&B alone waits 90 s: the 5 s init timeout plus the offline run's start, ~8 s here and
    # up to 16 s with `make test`'s two pytest processes on the two cores.
    assert switched_s < 45
    records = assert_recorded_offline(tracker, caplog, f"W&B init (online at {url}) failed", [1, 2, 3])
    assert [r["summary"]["update"] for r in records if r.get("type") == "summary"][-1]["loss"] == 7.0
    assert files_holding([tmp_path], [key]) == []  # W&B's logs and records of both runs hold no key


@pytest.mark.slow  # W&B's service start and refused init (~6 s)
def test_a_server_that_refuses_the_key_goes_offline(tmp_path, monkeypatch, caplog):
    """A W&B server on 127.0.0.1 that answers every request with 401 (a wrong key)."""

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"errors": [{"message": "invalid api key"}]}')

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    t0 = time.perf_counter()
    try:
        with caplog.at_level(logging.WARNING, logger="tp2d_exp.train.tracking"):
            tracker, rows = train_a_little(tmp_path, logger_cfg(tmp_path, mode="online"))
    finally:
        server.shutdown()
    seconds = time.perf_counter() - t0
    print(f"refused key: offline after {seconds:.1f}s")
    assert seconds < 45  # as above
    assert_recorded_offline(tracker, caplog, "401", [1, 2, 3])
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_wandb_dying_mid_run_goes_on_offline(tmp_path, caplog):
    """W&B's service process dies after step 1 (log calls then fail): the run goes on in an offline run with
    the same run id, the warning is said once, and metrics.jsonl has every step."""
    with caplog.at_level(logging.WARNING, logger="tp2d_exp.train.tracking"):
        with Tracker(str(tmp_path / "run"), *logger_cfg(tmp_path), "run", {"lr": 1e-3}) as tracker:
            tracker.log(row(1))
            first_dir = tracker.wandb_dir
            [service] = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "wandb-core"], capture_output=True,
                                       text=True).stdout.split()
            os.kill(int(service), signal.SIGKILL)
            os.waitpid(int(service), 0)
            for step in (2, 3):
                tracker.log(row(step))
    # The offline run holds every step (the dead service may have taken step 1 with it: it is logged again).
    assert_recorded_offline(tracker, caplog, "W&B log failed", [1, 2, 3])
    assert tracker.wandb_dir != first_dir
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]


def test_dir_that_cannot_be_created(tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    with caplog.at_level(logging.WARNING, logger="tp2d_exp.train.tracking"):
        _, rows = train_a_little(tmp_path, logger_cfg(tmp_path, dir=str(tmp_path / "a_file" / "outputs")))
    [warning] = w_and_b_warnings(caplog)
    assert "W&B init (offline) failed" in warning and "Not a directory" in warning
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_disk_too_full_for_wandb(tmp_path, caplog):
    """W&B drops records silently on a full disk (its writer runs in another process), so the free space is
    checked against logger.min_free_mb; a floor above what the disk has stands in for a full disk."""
    with caplog.at_level(logging.WARNING, logger="tp2d_exp.train.tracking"):
        _, rows = train_a_little(tmp_path, logger_cfg(tmp_path, min_free_mb=2**40))
    [warning] = w_and_b_warnings(caplog)
    assert "MiB free in" in warning and "below logger.min_free_mb=1099511627776" in warning
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_restarted_worker_group_resumes_the_same_wandb_run(tmp_path):
    lg = logger_cfg(tmp_path)
    first, _ = train_a_little(tmp_path, lg)
    second, rows = train_a_little(tmp_path, lg)  # the same run dir: a restart of the same job
    assert first.wandb_dir and second.wandb_dir and first.wandb_dir != second.wandb_dir
    # The run id as each attempt's own W&B record holds it (not the dir name, which W&B suffixes with -1
    # when both attempts start within the same second).
    assert wandb_run_id(first.wandb_dir) == wandb_run_id(second.wandb_dir)
    assert len(rows) == 6  # metrics.jsonl keeps what each attempt logged


@pytest.fixture(autouse=True)
def _no_ambient_wandb_settings(monkeypatch):
    for var in ("WANDB_MODE", "WANDB_BASE_URL", "WANDB_API_KEY", "WANDB_DIR", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    yield
    import wandb

    wandb.teardown()  # W&B's process-wide set-up keeps the settings it read from this test's environment
