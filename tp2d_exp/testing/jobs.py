"""Job specs composed from this checkout's conf/ without run.py, exactly as run.py builds them: what tests
and benchmarks drive setup() and train_step() with."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tp2d_exp.config.spec import JobContext, JobSpec

ROOT = Path(__file__).resolve().parents[2]  # the checkout: conf/ and outputs/ live here


def compose(overrides: list[str]) -> DictConfig:
    """The composed config run.py would see for these overrides (W&B off unless an override turns it on)."""
    from tp2d_exp.config.schema import compose as compose_config

    return compose_config(["logger=none", *overrides])


def compose_job(output_dir: Path, overrides: list[str], prepare: bool = True) -> JobSpec:
    """The job spec of these overrides with `output_dir` as its run dir; validated and prepared (tokenizer,
    token cache, steps) unless `prepare` is false. Tokenizer and token caches are shared (outputs/cache of
    the checkout): they are deterministic."""
    from tp2d_exp.config.spec import build_spec
    from tp2d_exp.config.validate import check_config
    from tp2d_exp.driver.prepare import prepare as prepare_job

    spec = build_spec(compose(overrides), JobContext(root=ROOT, output_dir=output_dir))
    if not prepare:
        return spec
    check_config(spec)
    return prepare_job(spec)
