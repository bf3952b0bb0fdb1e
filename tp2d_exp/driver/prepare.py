"""Validation's data stage on the driver, before any worker starts: load the tokenizer, build (or find) the
tokenized corpus that workers will read from the cache, count the steps, and check the checkpoint the job
will start from. The results fill the spec's `resolved` section."""

from __future__ import annotations

from tp2d_exp.config.errors import ConfigError, first_line
from tp2d_exp.config.spec import JobSpec
from tp2d_exp.config.validate import check_corpus, check_tokenizer


def tokenizer_source(spec: JobSpec) -> str:
    """model.tokenizer, else model.name_or_path, else the project's BPE (an architecture built from scratch)."""
    m = spec.model
    if m.tokenizer or m.name_or_path:
        return m.tokenizer or m.name_or_path
    from tp2d_exp.data.tokenizer import project_bpe_dir

    # A corpus this small supports a few thousand merges, so larger vocabularies (a 0.5B architecture's
    # 151936) keep unused embedding rows.
    return project_bpe_dir(spec.resolved.cache_dir, min(spec.arch.vocab_size, 8192))


def prepare(spec: JobSpec) -> JobSpec:
    from tp2d_exp.checkpoint.manager import resume_source
    from tp2d_exp.data.dataset import prepare_dataset
    from tp2d_exp.data.tokenizer import load_tokenizer
    from tp2d_exp.train.materialize import model_source_dir

    r = spec.resolved
    tokenizer_dir = tokenizer_source(spec)
    try:
        vocab = len(load_tokenizer(tokenizer_dir))
    except OSError as e:
        raise ConfigError(f"tokenizer {tokenizer_dir!r} (model.tokenizer or model.name_or_path) could not be "
                          f"loaded: {first_line(e)}; give a local dir, or check the network / HF_TOKEN") from e
    check_tokenizer(spec, vocab)
    try:
        num_samples = len(prepare_dataset(spec.data, r.data_files, tokenizer_dir, r.cache_dir))
    except (OSError, ConnectionError) as e:
        raise ConfigError(f"data={spec.data.name} could not be loaded: {first_line(e)}; check data.path, "
                          "or the network / HF cache for hub datasets") from e
    check_corpus(spec, num_samples)
    total = num_samples // r.global_batch_size * spec.run.num_epochs  # the last partial global batch is dropped
    spec = spec.with_resolved(
        tokenizer_dir=tokenizer_dir, num_samples=num_samples,
        total_steps=min(total, spec.run.max_steps) if spec.run.max_steps else total,
        model_dir=model_source_dir(spec.model, spec.arch, tokenizer_dir, r.cache_dir))
    return spec.with_resolved(resume_checkpoint=resume_source(spec))
