"""Evaluate a checkpoint (scripts/evaluate.py): its held-out loss and perplexity on any mesh, through the same
launcher and workers as training.

    compose (overrides) -> validate -> checkpoint found and checked against the model (not the corpus: scoring
    another corpus is the point of data.* overrides) -> data stage (tokenizer, held-out store)
    -> launch with resolved.evaluate_only -> the workers load it, score, write eval.json
"""

from __future__ import annotations

from pathlib import Path

from tp2d_exp.config.errors import ConfigError
from tp2d_exp.config.spec import JobContext, JobSpec, build_spec
from tp2d_exp.config.validate import check_config
from tp2d_exp.records import EVAL_FILE, EvalReport, RunStatus, RunSummary, read_json


def evaluation_spec(checkpoint: str, overrides: list[str], output_dir: Path) -> JobSpec:
    """The prepared job of an evaluation: ConfigError for anything that cannot work, before any worker."""
    from tp2d_exp.checkpoint.manager import CheckpointError, check_architecture, read_progress, resolve
    from tp2d_exp.config.schema import CONF_DIR, compose
    from tp2d_exp.driver.prepare import prepare_data

    # W&B off unless asked for: an evaluation is no training run.
    cfg = compose(["logger=none", *overrides, f"run.resume_from={checkpoint}"])
    spec = build_spec(cfg, JobContext(root=CONF_DIR.parent, output_dir=output_dir))
    check_config(spec)
    if spec.data.val_fraction <= 0:
        raise ConfigError(f"data.val_fraction={spec.data.val_fraction}: nothing is held out to evaluate; give the "
                          "data.* settings the run trained with (the default data holds out 2%), or another corpus "
                          "with data.val_fraction > 0")
    path = resolve(spec.run.resume_from, spec.resolved.storage_path)  # before the data work: seconds, not minutes
    try:
        saved = read_progress(path)
    except CheckpointError as e:
        raise ConfigError(f"checkpoint {checkpoint!r}: {e}") from None
    check_architecture(path, saved, spec.arch)
    return prepare_data(spec).with_resolved(resume_checkpoint=path, schedule=saved.schedule,
                                            start_samples=saved.samples_consumed, evaluate_only=True)


class EvaluationFailed(RuntimeError):
    """The launch failed: before any worker started (the cluster cannot serve it), or in the workers."""

    def __init__(self, summary: RunSummary):
        super().__init__(summary.error)
        self.never_started = summary.never_started


def evaluate_checkpoint(checkpoint: str, overrides: list[str], output_dir: Path) -> EvalReport:
    """Load `checkpoint` (a checkpoint dir, a run dir or a run name under cluster.storage_path, or a URI) onto
    the mesh the overrides give and score the first run.eval_samples held-out samples. Raises ConfigError
    (a value that cannot work, nothing started) or EvaluationFailed."""
    from tp2d_exp.driver import cluster
    from tp2d_exp.driver.launch import launch

    spec = evaluation_spec(checkpoint, overrides, output_dir)
    connect_s = cluster.connect_and_check(spec).connect_s if spec.cluster.address else None
    summary = launch(spec, connect_s)
    if summary.status is not RunStatus.completed:
        raise EvaluationFailed(summary)
    return read_json(EvalReport, output_dir / EVAL_FILE)
