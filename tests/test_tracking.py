"""Tracker isolation against real W&B: a server that cannot be reached, a dir that cannot be created, a disk
too full; each is reported once and the metrics still land in metrics.jsonl. A restarted worker group
resumes the same W&B run."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from tests.conftest import wandb_run_id
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


def test_unreachable_server_with_a_fake_key(tmp_path, monkeypatch, caplog):
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")  # W&B's default is 90 s
    with caplog.at_level(logging.WARNING, logger="tp2d_exp.train.tracking"):
        tracker, rows = train_a_little(tmp_path, logger_cfg(tmp_path, mode="online"))
    [warning] = w_and_b_warnings(caplog)
    assert f"W&B init (online at http://127.0.0.1:{port}) failed, continuing without W&B" in warning
    assert tracker.wandb_run is None and [r["step"] for r in rows] == [1, 2, 3]


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
    for var in ("WANDB_MODE", "WANDB_BASE_URL", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
