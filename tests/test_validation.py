"""Bad input fails before any worker starts, with one line naming the key and the fix: bad values in-process
through run.py's own job function (the stages in tp2d_exp.config.validate), a few of them and the
compose-time failures (typos, wrong types, unknown enum values) through run.py itself."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
from hydra.errors import ConfigCompositionException

from tests.conftest import ROOT, compose, run_py
from tp2d_exp.config.spec import JobContext

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
    "sequence_parallel_seq_length": (["parallelism.sequence_parallel=true", "data.seq_length=255"],
                                     "parallelism.sequence_parallel=true shards the sequence over tp=2"),
    "cluster_address": (["cluster.address=http://head:8265"], "cluster.address='http://head:8265' is not an address"),
    "documents_need_packing": (["data.packing=false", "data.attention_within_documents=true"],
                               "data.attention_within_documents=true needs data.packing=true"),
    "fault_rank": (["run.fault.rank=4"], "run.fault.rank=4 is not a worker rank; use 0..3"),
    "num_to_keep": (["run.num_to_keep=0"], "run.num_to_keep=0 must be at least 1"),
    "resume_from_missing": (["run.resume_from=/nonexistent/ckpt"],
                            "run.resume_from='/nonexistent/ckpt' is neither a checkpoint dir, a run dir nor"),
    "global_batch_multiple": (["run.global_batch_size=6"],
                              "run.global_batch_size=6 is not a multiple of run.batch_size_per_gpu*dp=4"),
    "elastic_without_checkpoints": (["cluster.elastic=true"],
                                    "cluster.elastic=true resumes each resize from the newest checkpoint and grows "
                                    "back at the next one: set run.checkpoint_every (steps) > 0"),
    "elastic_min_dp_batch": (["parallelism=tp1_dp4", "cluster.elastic=true", "cluster.min_dp=3",
                              "run.checkpoint_every=2"],
                             "cluster.min_dp=3: the global batch of 8 samples is not a multiple of "
                             "run.batch_size_per_gpu*min_dp=6"),
}


# Enums: an unknown value fails while Hydra composes, naming the key, the value and the choices.
COMPOSE_CASES = {
    "ac_mode": ("run.activation_checkpointing=sometimes",
                "Invalid value 'sometimes', expected one of [none, selective, full]"),
    "nonfinite_policy": ("run.nonfinite=ignore", "Invalid value 'ignore', expected one of [stop, skip]"),
    "fault_mode": ("run.fault.mode=crash", "Invalid value 'crash', expected one of [raise, exit]"),
    "family_without_tp_plan": ("model.family=gpt2", "Invalid value 'gpt2', expected one of [qwen2, llama, mistral]"),
    "device": ("cluster.device=tpu", "Invalid value 'tpu', expected one of [auto, cpu, cuda]"),
    "logger_mode": ("logger.mode=sometimes", "expected one of [auto, online, offline, disabled]"),
    "data_source": ("data.source=web", "Invalid value 'web', expected one of [synthetic, text_files, hf, mixture, store]"),
    "attn_implementation": ("model.attn_implementation=fast", "Invalid value 'fast', expected one of [sdpa, eager"),
}


def run_job_in_process(overrides: list[str], run_dir) -> tuple[int, str]:
    """run.py's job function on a composed config: (exit code, stderr). Launching is forbidden: every case
    must fail before any worker starts."""
    from tp2d_exp.driver import job, launch

    def no_launch(*args, **kwargs):
        raise AssertionError("a bad value reached the launch")

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.setattr(launch, "launch", no_launch)
        try:
            job.run_job(compose(overrides), JobContext(root=ROOT, output_dir=run_dir))
            code = 0
        except SystemExit as e:
            code = e.code
    return code, stderr.getvalue()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    empty = tmp_path_factory.mktemp("corpus") / "empty.txt"
    empty.write_text("\n\n")
    from tp2d_exp.data.tokenizer import project_bpe_dir

    tokenizer = project_bpe_dir(str(ROOT / "outputs" / "cache"), 8192)
    cases = {**CASES,
             "empty_corpus": (["data=text_files", f"data.path={empty}"], "the corpus yields no sample"),
             "vocab_below_tokenizer": (["model.vocab_size=1000", f"model.tokenizer={tokenizer}"],
                                       "model.vocab_size=1000 is smaller than the tokenizer's 8192 tokens")}
    results = {}
    for name, (overrides, _) in cases.items():
        run_dir = tmp_path_factory.mktemp(name)
        results[name] = (*run_job_in_process(overrides, run_dir), run_dir)
    return cases, results


@pytest.mark.parametrize("case", [*CASES, "empty_corpus", "vocab_below_tokenizer"])
def test_bad_value_fails_early_with_one_clear_line(outcomes, case):
    cases, results = outcomes
    code, stderr, run_dir = results[case]
    expected = cases[case][1]
    assert code == 2, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failure"] == "config" and expected in summary["error"]


@pytest.mark.parametrize("case", COMPOSE_CASES)
def test_unknown_enum_value_fails_at_compose_time(case):
    override, expected = COMPOSE_CASES[case]
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert f"Error merging override {override}" in str(e.value) and expected in str(e.value.__cause__)


def test_run_py_prints_one_line_for_each_stage(tmp_path):
    """The command line a user types: a config-stage value (exit 2, one error line, no traceback) and an
    unknown enum value (Hydra's composition error naming key, value and choices)."""
    proc = run_py("logger=none", "model=qwen2_5_0_5b", "parallelism=tp4_dp1", f"hydra.run.dir={tmp_path}",
                  returncode=None)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "parallelism.tp=4 does not divide model.num_attention_heads=14" in errors[0]
    assert "Traceback" not in proc.stderr
    proc = run_py("logger=none", "run.nonfinite=ignore", returncode=None)
    assert proc.returncode != 0 and "Invalid value 'ignore', expected one of [stop, skip]" in proc.stderr
    assert "full_key: run.nonfinite" in proc.stderr


def test_typo_in_a_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="Could not override 'run.max_step'") as e:
        compose(["run.max_step=3"])
    assert "Key 'max_step' not in 'RunConfig'" in str(e.value.__cause__)


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="run.learning_rate=fast") as e:
        compose(["run.learning_rate=fast"])
    assert "Value 'fast' of type 'str' could not be converted to Float" in str(e.value.__cause__)


def test_cluster_stage_decides_the_device_and_refuses_what_the_nodes_cannot_hold(tmp_path):
    """Validation's cluster stage on a cluster's inventory (node id -> resources), as Ray reports it."""
    from tests.conftest import compose_job
    from tp2d_exp.config.errors import ResourceError
    from tp2d_exp.config.validate import check_cluster

    cpu_nodes, gpu_nodes = {"a": {"CPU": 2.0}, "b": {"CPU": 2.0}}, {"a": {"CPU": 16.0, "GPU": 4.0}}
    spec = compose_job(tmp_path, [], prepare=False)  # tp2_dp2, cluster.device=auto
    capacity = check_cluster(spec, cpu_nodes, {"CPU": 3.0})
    assert not capacity.use_gpu and capacity.kind == "CPU" and capacity.workers_per_node == {"a": 2, "b": 2}
    assert capacity.free == 3.0 and capacity.max_per_node == 2
    assert check_cluster(spec, gpu_nodes, {}).use_gpu
    cases = {
        ("cluster.device=cuda",): (cpu_nodes, "cluster.device=cuda but the Ray cluster has no GPUs; use "
                                              "cluster.device=auto or cpu"),
        ("run.compile=true",): (cpu_nodes, "run.compile=true needs CUDA (the CPU runs use eager mode) but the Ray "
                                           "cluster has no GPU; set run.compile=false"),
        ("run.compile=true", "cluster.device=cpu"): (gpu_nodes, "run.compile=true needs CUDA (the CPU runs use eager "
                                                                "mode) but cluster.device=cpu; set run.compile=false "
                                                                "or cluster.device=auto"),
        ("parallelism=tp4_dp2",): (cpu_nodes, "parallelism: tp*dp=8 workers of 1 CPU each need 8 CPUs but the Ray "
                                              "cluster has 4 CPUs on 2 nodes (2+2)"),
        ("parallelism=tp4_dp2", "cluster.device=cuda"): (gpu_nodes, "need 8 GPUs but the Ray cluster has 4 GPUs on "
                                                                    "1 node (4); lower parallelism.tp/parallelism.dp"),
        ("parallelism.tp=1", "parallelism.dp=3", "cluster.cpus_per_worker=1.25"): (cpu_nodes, "each node holds 1+1 = 2 workers"),
    }
    for overrides, (nodes, expected) in cases.items():
        with pytest.raises(ResourceError, match=re.escape(expected)):
            check_cluster(compose_job(tmp_path, list(overrides), prepare=False), nodes, {})
