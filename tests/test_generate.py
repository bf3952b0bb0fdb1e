"""scripts/generate.py refuses what is neither a checkpoint nor an HF model dir, in one line, before torch
loads. Text from a trained model: tests/test_end_to_end.py (the default run's checkpoint and its export)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROMPT = "The river"


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "scripts/generate.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("source,says", [
    ("missing", "does not exist"),
    ("plain_dir", "is neither a checkpoint dir nor a Hugging Face model dir"),
    ("config_only", "is neither a checkpoint dir nor a Hugging Face model dir"),  # like a checkpoint's hf/
])
def test_a_bad_source_is_one_line_and_exit_2(tmp_path, source, says):
    """Found before torch loads: well under a second each."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "qwen2"}')
    path = {"missing": tmp_path / "missing", "plain_dir": tmp_path, "config_only": tmp_path / "hf"}[source]
    proc = finish(start(str(path), "--prompt", PROMPT))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and says in proc.stderr and str(path) in proc.stderr
