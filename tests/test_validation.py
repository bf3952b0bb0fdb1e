"""Bad input fails before any worker starts, through run.py, with one line naming the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT

CASES = {
    "tp_not_positive": (["parallelism.tp=0"], "parallelism.tp=0 must be a positive integer"),
    "dp_not_positive": (["parallelism.dp=-1"], "parallelism.dp=-1 must be a positive integer"),
    "tp_vs_heads": (["model=qwen2_5_0_5b", "parallelism=tp4_dp1"],
                    "parallelism.tp=4 does not divide model.num_attention_heads=14"),
    "tp_vs_kv_heads": (["parallelism=tp8_dp1"], "parallelism.tp=8 does not divide model.num_key_value_heads=4"),
    "tp_vs_intermediate": (["parallelism=tp4_dp1", "model.intermediate_size=770"],
                           "parallelism.tp=4 does not divide model.intermediate_size=770"),
    "seq_above_positions": (["data.seq_length=4096"],
                            "data.seq_length=4096 exceeds model.max_position_embeddings=2048"),
    "percentage_zero": (["data.dataset_percentage=0"], "data.dataset_percentage=0.0 must be in (0, 100]"),
    "percentage_above_100": (["data.dataset_percentage=150"], "data.dataset_percentage=150.0 must be in (0, 100]"),
    "batch_size": (["run.batch_size_per_gpu=0"], "run.batch_size_per_gpu=0 must be positive"),
    "learning_rate": (["run.learning_rate=-0.1"], "run.learning_rate=-0.1 must be positive"),
    "missing_path": (["data=text_files", "data.path=/nonexistent/corpus.txt"],
                     "data.path='/nonexistent/corpus.txt' matches no .txt/.jsonl/.json/.parquet file"),
    "missing_model_dir": (["model.name_or_path=./no_such_model_dir"],
                          "model.name_or_path='./no_such_model_dir' is not a directory"),
    "family_without_tp_plan": (["model.family=gpt2"], "model.family='gpt2' has no TP plan"),
    "ac_mode": (["run.activation_checkpointing=layer"],
                "run.activation_checkpointing='layer' must be none, selective or full"),
    "compile_on_cpu": (["run.compile=true", "cluster.device=cpu"], "run.compile=true needs CUDA"),
    "sequence_parallel_seq_length": (["parallelism.sequence_parallel=true", "data.seq_length=255"],
                                     "parallelism.sequence_parallel=true shards the sequence over tp=2"),
    "cluster_address": (["cluster.address=http://head:8265"], "cluster.address='http://head:8265' is not an address"),
    "documents_need_packing": (["data.packing=false", "data.attention_within_documents=true"],
                               "data.attention_within_documents=true needs data.packing=true"),
    "nonfinite_policy": (["run.nonfinite=ignore"], "run.nonfinite='ignore' must be stop or skip"),
    "fault_rank": (["run.fault.rank=4"], "run.fault.rank=4 is not a worker rank; use 0..3"),
    "fault_mode": (["run.fault.mode=crash"], "run.fault.mode='crash' must be raise or exit"),
    "num_to_keep": (["run.num_to_keep=0"], "run.num_to_keep=0 must be at least 1"),
    "resume_from_missing": (["run.resume_from=/nonexistent/ckpt"],
                            "run.resume_from='/nonexistent/ckpt' is neither a checkpoint dir, a Ray run dir nor"),
    "global_batch_multiple": (["run.global_batch_size=6"],
                              "run.global_batch_size=6 is not a multiple of run.batch_size_per_gpu*dp=4"),
}


def run_py(*overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "logger=none", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    empty = tmp_path_factory.mktemp("corpus") / "empty.txt"
    empty.write_text("\n\n")
    from tp2d_exp.tokenizer import project_bpe_dir

    tokenizer = project_bpe_dir(str(ROOT / "outputs" / "cache"), 8192)
    cases = {**CASES,
             "empty_corpus": (["data=text_files", f"data.path={empty}"], "the corpus yields no sample"),
             "vocab_below_tokenizer": (["model.vocab_size=1000", f"model.tokenizer={tokenizer}"],
                                       "model.vocab_size=1000 is smaller than the tokenizer's 8192 tokens")}
    with ThreadPoolExecutor(4) as pool:  # each is a short process; run them side by side
        results = dict(zip(cases, pool.map(lambda c: run_py(*c[0], "hydra.run.dir=" + str(
            tmp_path_factory.mktemp("run"))), cases.values())))
    return cases, results


@pytest.mark.parametrize("case", [*CASES, "empty_corpus", "vocab_below_tokenizer"])
def test_bad_value_fails_early_with_one_clear_line(outcomes, case):
    cases, results = outcomes
    proc = results[case]
    expected = cases[case][1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_typo_in_a_key_fails_at_compose_time():
    proc = run_py("run.max_step=3")
    assert proc.returncode != 0
    assert "Key 'max_step' not in 'RunConfig'" in proc.stderr


def test_wrong_type_fails_at_compose_time():
    proc = run_py("run.learning_rate=fast")
    assert proc.returncode != 0
    assert "run.learning_rate" in proc.stderr and "fast" in proc.stderr
