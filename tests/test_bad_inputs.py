"""Bad values generated from the config schema itself (the dataclasses registered in Hydra's ConfigStore), so a
key added tomorrow is covered the day it is added: every numeric key negative, zero and absurdly large (and NaN
for floats), every path key missing, empty, of the wrong kind and binary garbage, every enum an unknown word,
every bool a non-bool. Each case runs in-process through run.py's own job function (compose, the config and
data stages, then the cluster stage on a fake inventory in place of the launch) and must either pass (reach
the launch: the value is in fact valid, listed in VALID_BECAUSE with the reason) or fail with one line naming
the key; a traceback, a hang or a pass not listed fails the test. A few cases run through run.py itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import ROOT, run_py
from tp2d_exp.config.schema import Config

ABSURD_INT = 10**15
ABSURD_FLOAT = 1e300


@dataclass(frozen=True)
class Case:
    key: str  # the dotted config key, e.g. run.max_steps
    kind: str  # which bad value: negative, zero, absurd, nan, unknown, non_bool, missing, ...
    value: str  # the command-line value (a path key's: made by Paths)
    expects: str = ""  # a path key's: "file" or "dir"

    @property
    def id(self) -> str:
        return f"{self.key}:{self.kind}"


def schema_keys(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, resolved type, field) of every leaf of a schema dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else []
        tp = inner[0] if len(inner) == 1 else tp
        if dataclasses.is_dataclass(tp):
            yield from schema_keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


PATH_KINDS = ("missing", "empty_string", "empty", "wrong_kind", "garbage")


def bad_values(tp: Any, f: dataclasses.Field) -> dict[str, str]:
    """The bad values of one key by kind, as command-line strings; a path key's are made by `Paths`."""
    if f.metadata.get("path"):
        return {kind: "" for kind in PATH_KINDS}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"unknown": "no_such_choice"}
    if tp is bool:
        return {"non_bool": "maybe"}
    if tp is int:
        return {"negative": "-1", "zero": "0", "absurd": str(ABSURD_INT)}
    if tp is float:
        return {"negative": "-1.0", "zero": "0.0", "absurd": str(ABSURD_FLOAT), "nan": "nan"}
    if tp is str:
        return {"empty_string": "''"}
    if typing.get_origin(tp) is list:
        return {"non_list": "not_a_list"}
    return {}  # dicts (the GPU table): its rows are data, not keys


def generate() -> list[Case]:
    return [Case(key, kind, value, f.metadata.get("path", "")) for key, tp, f in schema_keys(Config)
            for kind, value in bad_values(tp, f).items()]


class Paths:
    """The bad local paths and the good corpora the cases run on, made once under one tmp dir."""

    def __init__(self, root: Path) -> None:
        from tp2d_exp.data import synthetic

        self.corpus = root / "corpus.txt"
        self.corpus.write_text("\n".join(synthetic.documents(200, seed=0)) + "\n")
        self.hf_dir = root / "hf_dataset"  # a local dataset dir (datasets.load_dataset reads it offline)
        self.hf_dir.mkdir()
        (self.hf_dir / "train.txt").write_text(self.corpus.read_text())
        self.missing = root / "no_such_path"
        self.empty_file = root / "empty.txt"
        self.empty_file.write_bytes(b"")
        self.empty_dir = root / "empty_dir"
        self.empty_dir.mkdir()
        garbage = b"\xff\xfe\x00" + os.urandom(4093)  # never valid UTF-8, JSON or safetensors
        self.garbage_file = root / "garbage.txt"
        self.garbage_file.write_bytes(garbage)
        # A dir of garbage under every name a model, tokenizer, dataset or checkpoint dir holds.
        self.garbage_dir = root / "garbage_dir"
        self.garbage_dir.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "commit.json",
                     "train_state.json", ".metadata", "__0_0.distcp", "train.txt"):
            (self.garbage_dir / name).write_bytes(garbage)

    def value(self, case: Case) -> str:
        if not case.expects:
            return case.value
        file = case.expects == "file"
        return {"missing": str(self.missing), "empty_string": "''",
                "empty": str(self.empty_file if file else self.empty_dir),
                "wrong_kind": str(self.empty_dir if file else self.garbage_file),
                "garbage": str(self.garbage_file if file else self.garbage_dir)}[case.kind]

    def context(self, case: Case) -> list[str]:
        """The group and value overrides the case's key acts under."""
        ctx = next((o for prefix, o in CONTEXT.items() if case.key.startswith(prefix)), [])
        return [*BASE, *(o.format(corpus=self.corpus, hf_dir=self.hf_dir) for o in ctx)]


# Keys that act only under another setting run under it; every other key runs on BASE (a small corpus).
BASE = ["logger=wandb", "logger.mode=offline", "data.synthetic_documents=200", "data.seq_length=64"]
CONTEXT = {
    "data.path": ["data=text_files", "data.path={corpus}"],
    "data.text_field": ["data=text_files", "data.path={corpus}"],
    "data.hf_name": ["data.source=hf", "data.hf_name={hf_dir}"],
    "data.hf_config": ["data.source=hf", "data.hf_name={hf_dir}"],
    "data.split": ["data.source=hf", "data.hf_name={hf_dir}"],
    "hardware.": ["run.plan_only=true"],
}
NODES = {"node-a": {"CPU": 8.0}, "node-b": {"CPU": 8.0}}  # the cluster stage's inventory (node id -> resources)
CASE_TIMEOUT_S = 20


class Launched(Exception):
    """The job passed every stage before the workers: the fake launch's way out."""


class Hang(BaseException):
    """A case ran past CASE_TIMEOUT_S (a BaseException, so that no `except Exception` of the code swallows it)."""


@dataclass(frozen=True)
class Outcome:
    status: str  # passed: the job would launch; failed: one clean line; bad: anything else
    message: str
    seconds: float


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """A hang becomes an exception (SIGALRM; the tests run in the main thread)."""
    import signal

    def expired(signum, frame):
        raise Hang(f"no outcome within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Composer:
    """Hydra's compose of a case: each context composed once (what costs ~0.2 s), then the case's one override
    applied to a copy by the function Hydra's own compose applies command-line value overrides with, so the
    compose-stage errors (wrong type, unknown enum value) are Hydra's."""

    def __init__(self) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.parser = OverridesParser.create()
        self.contexts: dict[tuple[str, ...], Any] = {}

    def __call__(self, context: list[str], override: str):
        import copy

        from hydra import compose
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        key = tuple(context)
        if key not in self.contexts:
            self.contexts[key] = compose(config_name="config", overrides=["logger=none", *context])
        cfg = copy.deepcopy(self.contexts[key])
        ConfigLoaderImpl._apply_overrides_to_config(self.parser.parse_overrides([override]), cfg)
        return cfg


def run_case(compose: Composer, context: list[str], override: str, run_dir: Path) -> Outcome:
    """run.py's job on a context plus one override, in-process, with the cluster stage run on NODES where the
    launch (and an attached cluster's connection) would start Ray."""
    from hydra.errors import ConfigCompositionException

    from tp2d_exp.config.spec import JobContext
    from tp2d_exp.config.validate import check_cluster
    from tp2d_exp.driver import cluster, job, launch

    def fake_launch(spec, connect_s=None):
        check_cluster(spec, NODES, {"CPU": 16.0})
        raise Launched

    def fake_connect(spec):
        check_cluster(spec, NODES, {"CPU": 16.0})
        raise Launched

    start = time.perf_counter()
    stderr = io.StringIO()
    try:
        with (deadline(CASE_TIMEOUT_S), pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr)):
            mp.setattr(launch, "launch", fake_launch)
            mp.setattr(cluster, "connect_and_check", fake_connect)
            try:
                cfg = compose(context, override)
            except ConfigCompositionException as e:
                return Outcome("failed", f"{e} ({e.__cause__})".replace("\n", " "), time.perf_counter() - start)
            try:
                job.run_job(cfg, JobContext(root=ROOT, output_dir=run_dir))
                return Outcome("passed", "planned", time.perf_counter() - start)  # run.plan_only: no launch
            except Launched:
                return Outcome("passed", "", time.perf_counter() - start)
            except SystemExit as e:
                errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]
                ok = e.code == 2 and len(errors) == 1 and "Traceback" not in stderr.getvalue()
                message = errors[0] if ok else f"exit {e.code}: {stderr.getvalue()[-500:]}"
                return Outcome("failed" if ok else "bad", message, time.perf_counter() - start)
    except BaseException as e:  # noqa: B036 - a traceback, a hang or a test bug: all bad outcomes
        return Outcome("bad", f"{type(e).__name__}: {e}"[:500].replace("\n", " "), time.perf_counter() - start)


CASES = generate()


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Iterator[tuple[Paths, Composer]]:
    """One Hydra context, one set of paths and corpora, shared by every case (the tokenizer and token caches
    under outputs/cache are shared too)."""
    from hydra import initialize_config_dir

    from tp2d_exp.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield Paths(tmp_path_factory.mktemp("bad_inputs")), Composer()


# The generated values that are in fact valid, by why: each must pass every stage, every other case must fail
# in one line naming its key. A new key's value that passes without being listed here fails the test: add a
# check for it (tp2d_exp.config.validate), or list it with the reason it is valid.
VALID_BECAUSE = {
    "empty means null, the key's default": [
        "model.name_or_path:empty_string", "model.tokenizer:empty_string", "data.hf_config:empty_string",
        "run.name:empty_string", "run.resume_from:empty_string", "logger.group:empty_string",
        "cluster.storage_path:empty_string", "data.store_dir:empty_string"],
    "a label only": ["model.name:empty_string", "data.name:empty_string", "hardware.name:empty_string"],
    "0 is documented: no limit, the default, off or never": [
        "run.max_steps:zero", "run.global_batch_size:zero", "run.lr_decay_steps:zero", "run.max_grad_norm:zero",
        "run.checkpoint_every:zero", "run.fault.fail_at_step:zero", "run.fault.nan_at_step:zero",
        "run.measure_step:zero", "run.profile_steps:zero", "logger.min_free_mb:zero", "run.max_failures:zero",
        "run.eval_every:zero", "run.eval_samples:zero", "data.val_fraction:zero", "data.mixture_samples:zero",
        "data.build_processes:zero"],
    "-1 is documented: restarts without limit": ["run.max_failures:negative"],
    "0 is a legal setting": ["run.min_lr_ratio:zero", "run.warmup_steps:zero", "run.weight_decay:zero",
                             "run.adam_beta1:zero", "run.adam_beta2:zero", "run.seed:zero", "run.fault.rank:zero",
                             "hardware.intra_node_latency_us:zero", "hardware.inter_node_latency_us:zero",
                             "hardware.allocator_overhead:zero", "hardware.cuda_context_gib:zero"],
    "a step, count or cadence past the end of any run: never reached, or the data ends the run first": [
        "run.max_steps:absurd", "run.num_epochs:absurd", "run.warmup_steps:absurd", "run.lr_decay_steps:absurd",
        "run.log_interval:absurd", "run.checkpoint_every:absurd", "run.num_to_keep:absurd", "run.eval_every:absurd",
        "run.eval_samples:absurd",
        "run.max_failures:absurd", "run.fault.fail_at_step:absurd", "run.fault.nan_at_step:absurd",
        "run.measure_step:absurd", "run.profile_steps:absurd"],
    "a finite optimiser value: a diverging run stops at its first non-finite loss (run.nonfinite)": [
        "run.learning_rate:absurd", "run.weight_decay:absurd"],
    "a huge limit: no clipping, W&B off (reported once; metrics.jsonl goes on)": [
        "run.max_grad_norm:absurd", "logger.min_free_mb:absurd"],
    "the model has no table of this size: RoPE positions are computed, a huge base barely rotates": [
        "model.max_position_embeddings:absurd", "model.rope_theta:absurd"],
    "a storage dir: created when missing, the run's dir (or a store's) made inside it": [
        "cluster.storage_path:missing", "cluster.storage_path:empty", "cluster.storage_path:garbage",
        "data.store_dir:missing", "data.store_dir:empty", "data.store_dir:garbage"],
    "a plan on an extreme (but finite) interconnect: every GPU in one node, free or slow links": [
        "hardware.gpus_per_node:absurd", "hardware.intra_node_gbps:absurd", "hardware.inter_node_gbps:absurd",
        "hardware.intra_node_latency_us:absurd", "hardware.inter_node_latency_us:absurd"],
}
VALID = {case: why for why, cases in VALID_BECAUSE.items() for case in cases}


def test_the_valid_list_names_generated_cases():
    assert set(VALID) <= {c.id for c in CASES}, set(VALID) - {c.id for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_generated_bad_value_passes_or_fails_in_one_line_naming_the_key(harness, case, tmp_path):
    paths, compose = harness
    out = run_case(compose, paths.context(case), f"{case.key}={paths.value(case)}", tmp_path)
    assert out.status != "bad", out.message
    if case.id in VALID:
        assert out.status == "passed", f"{case.id} is valid ({VALID[case.id]}) but failed: {out.message}"
    else:
        assert out.status == "failed", (f"{case.key}={paths.value(case)} passed every stage: add a check for it, or "
                                        "list it in VALID_BECAUSE with the reason it is valid")
        assert case.key in out.message, f"the error does not name {case.key}: {out.message}"


# ---- through run.py: the cases a user met as tracebacks or slow Hub failures, each in under 10 s

@pytest.fixture(scope="module")
def unreachable_hubs() -> Iterator[dict[str, str]]:
    """Two Hubs that cannot serve: a closed port (refused at once) and a port that accepts connections and
    never answers (what the probe's timeout bounds)."""
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = closed.getsockname()[1]
    closed.close()
    yield {"refusing": f"http://127.0.0.1:{port}", "silent": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    silent.close()


def _run_py_cases(tmp: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00" + os.urandom(4093))
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 256, "num_attention_heads": 8, '
                                       '"num_key_value_heads": 4, "intermediate_size": 768}')
    (model / "tokenizer.json").write_text("this is not JSON {")
    return {
        "empty_txt": (["data=text_files", f"data.path={tmp / 'empty.txt'}"], {}, "every file it matches is empty"),
        "binary_txt": (["data=text_files", f"data.path={tmp / 'binary.txt'}"], {}, "binary.txt is not UTF-8 text"),
        "tokenizer_not_json": ([f"model.name_or_path={model}"], {},
                               f"model.name_or_path='{model}': tokenizer.json is not JSON"),
        "hub_refusing": (["data=wikitext"], {"HF_ENDPOINT": "refusing"},
                         "data.hf_name='Salesforce/wikitext' is a Hub id but the Hub"),
        "hub_silent": (["model=qwen2_5_0_5b"], {"HF_ENDPOINT": "silent"},
                       "model.name_or_path='Qwen/Qwen2.5-0.5B' is a Hub id but the Hub"),
    }


RUN_PY_CASES = ["empty_txt", "binary_txt", "tokenizer_not_json", "hub_refusing", "hub_silent"]


@pytest.mark.slow
@pytest.mark.parametrize("case", RUN_PY_CASES)
def test_run_py_fails_in_one_line_within_10_s(case, tmp_path, unreachable_hubs):
    overrides, env, expected = _run_py_cases(tmp_path)[case]
    env = {k: unreachable_hubs[v] for k, v in env.items()}
    env.update(HF_HUB_CACHE=str(tmp_path / "hf_cache"), HF_HUB_OFFLINE="0")
    start = time.perf_counter()
    proc = run_py("logger=none", *overrides, f"hydra.run.dir={tmp_path / 'run'}", returncode=None, env=env, timeout=60)
    seconds = time.perf_counter() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if case.startswith("hub"):
        assert "HF_HUB_OFFLINE=1" in errors[0] and "give a local dir" in errors[0]
    assert seconds < 10, f"{case}: {seconds:.1f} s"


def test_a_text_file_binary_past_the_validation_sniff_fails_in_the_data_stage(harness, tmp_path):
    """Stage 2 reads the start of each text file; a file that turns binary later fails where datasets reads it
    all, naming the file."""
    from tp2d_exp.config.validate import SNIFF_BYTES

    corpus = tmp_path / "late_binary.txt"
    corpus.write_bytes(b"plain text\n" * SNIFF_BYTES + b"\xff\xfe binary\n")
    out = run_case(harness[1], [*BASE, "data=text_files"], f"data.path={corpus}", tmp_path / "run")
    assert out.status == "failed" and f"data.path='{corpus}': {corpus} is not UTF-8 text" in out.message, out
