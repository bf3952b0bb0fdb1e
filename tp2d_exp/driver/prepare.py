"""Validation's data stage on the driver, before any worker starts: probe the Hugging Face Hub when the job
names a hub id, load the tokenizer, build (or find) the tokenized corpus that workers will read from the
cache, find and check the checkpoint the job will start from, and fix the run's schedule in samples. The
results fill the spec's `resolved` section."""

from __future__ import annotations

import logging
from pathlib import Path

from tp2d_exp.config.errors import ConfigError, first_line
from tp2d_exp.config.schedule import Schedule
from tp2d_exp.config.schema import DataSource
from tp2d_exp.config.spec import JobSpec
from tp2d_exp.config.validate import check_corpus, check_heldout, check_tokenizer, looks_local

log = logging.getLogger(__name__)


# How long the Hub may take to answer one request before it counts as unreachable. huggingface_hub itself
# retries a failed request 5 times with backoff (1+2+4+8+8 s), so each file cost ~25 s before its error.
HUB_PROBE_TIMEOUT_S = 3.0


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
    """The data stage, then the checkpoint and schedule the job starts from."""
    return plan_start(prepare_data(spec))


def prepare_data(spec: JobSpec) -> JobSpec:
    """Tokenizer, the tokenized corpus (and its held-out store), checked against the job."""
    check_hub(spec)  # before the imports below (torch, transformers): an unreachable Hub fails in seconds
    from tp2d_exp.data.dataset import Split, build_stores, open_samples
    from tp2d_exp.data.tokenizer import load_tokenizer
    from tp2d_exp.train.materialize import model_source_dir

    r = spec.resolved
    tokenizer_dir = tokenizer_source(spec)
    try:
        tok = load_tokenizer(tokenizer_dir)
    except Exception as e:  # a local dir's files are the user's input: any failure (bad JSON, a missing field)
        key = "model.tokenizer" if spec.model.tokenizer else "model.name_or_path"
        raise ConfigError(f"{key}={tokenizer_dir!r}: the tokenizer could not be loaded "
                          f"({type(e).__name__}: {first_line(e)}); give a Hugging Face tokenizer dir (tokenizer.json, "
                          "tokenizer_config.json) or hub id, or check HF_TOKEN") from e
    check_tokenizer(spec, len(tok))
    if spec.cluster.address:
        # Attached, file sources are tokenized there by Ray Data (the driver connected already), each task
        # writing its part into the store dir: every node must see the same one.
        from tp2d_exp.driver.cluster import check_shared_paths

        check_shared_paths(spec)
    try:
        stores = build_stores(spec, tok, on_ray=bool(spec.cluster.address))
    except (OSError, ConnectionError) as e:
        raise ConfigError(f"data={spec.data.name} could not be loaded: {first_line(e)}; check data.path, "
                          "data.store_dir, or the network / HF cache for hub datasets") from e
    for ref in stores:
        log.info("token store of %s: %s tokens, %s samples, %s", ref.key, f"{ref.tokens:,}", f"{ref.samples:,}",
                 "reused" if ref.reused else f"built in {ref.build_s:.1f} s ({ref.built_by})")
    spec = spec.with_resolved(tokenizer_dir=tokenizer_dir, stores=stores)
    dataset = open_samples(spec)
    heldout = open_samples(spec, Split.heldout) if spec.data.val_fraction > 0 else None
    check_corpus(spec, len(dataset))
    if heldout is not None:
        check_heldout(spec, len(heldout))
    spec = spec.with_resolved(num_samples=len(dataset), data_digest=dataset.digest,
                              num_heldout_samples=len(heldout) if heldout is not None else 0,
                              model_dir=model_source_dir(spec.model, spec.arch, tokenizer_dir, r.cache_dir))
    return spec


def check_hub(spec: JobSpec) -> None:
    """Fail in seconds, naming the offline fixes, when the job needs the Hugging Face Hub (a hub id for the
    tokenizer, the pretrained weights or the dataset) and the Hub does not answer. Under HF_HUB_OFFLINE=1 the
    libraries read their caches and fail at once on what is not there, so there is nothing to probe."""
    m, d = spec.model, spec.data
    needs = [(key, value) for key, value, used in (
        ("model.tokenizer", m.tokenizer, True),
        ("model.name_or_path", m.name_or_path, not m.tokenizer or m.pretrained),
        ("data.hf_name", d.hf_name, d.source is DataSource.hf),
        *((f"data.mixture[{i}].hf_name", s.hf_name, d.source is DataSource.mixture and s.source is DataSource.hf)
          for i, s in enumerate(d.mixture))) if used and value and not looks_local(value)]
    if not needs:
        return
    import httpx2
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return
    try:  # the endpoint the libraries would contact next, through the same client (proxies, certificates)
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except httpx2.TransportError as e:
        key, value = needs[0]
        what = "dataset" if key.endswith("hf_name") else "model"
        cached = Path(constants.HF_HUB_CACHE, f"{what}s--{value.replace('/', '--')}").is_dir()
        raise ConfigError(
            f"{key}={value!r} is a Hub id but the Hub ({constants.ENDPOINT}) cannot be reached "
            f"({first_line(e) or type(e).__name__}); give a local dir as {key}, or run with HF_HUB_OFFLINE=1 to read "
            f"the HF cache ({constants.HF_HUB_CACHE}, which {'holds' if cached else 'does not hold'} this {what})"
        ) from None


def plan_start(spec: JobSpec) -> JobSpec:
    """The checkpoint the job starts from and the schedule it follows. A same-name rerun continues its run:
    the checkpoint's schedule, and its optimiser and schedule settings must not change. A run.resume_from
    is a new run from the checkpoint's sample position: its own settings, each change reported."""
    from tp2d_exp.checkpoint.manager import Progress, changed_settings, find_start
    from tp2d_exp.data.order import BatchOrder

    start = find_start(spec)
    if start and start.own:
        if changes := changed_settings(start.saved, spec.run):
            raise ConfigError(f"{', '.join(changes)}: run.name={spec.resolved.run_name!r} continues its checkpoint "
                              f"{start.path}, whose schedule and optimiser these fix; keep the checkpoint's value, "
                              "or start a new run from it with run.resume_from (only the global batch size and "
                              "the mesh may change)")
        return spec.with_resolved(schedule=start.saved.schedule, start_samples=start.saved.samples_consumed)
    at = start.saved if start else Progress()
    for change in changed_settings(start.saved, spec.run) if start else ():
        log.warning("run.resume_from: %s", change)
    order = BatchOrder.of(spec)
    end = order.end_samples(at.samples_consumed, at.epoch, at.sample_in_epoch, spec.run.num_epochs)
    return spec.with_resolved(schedule=Schedule.of(spec.run, order.global_batch_size, end),
                              start_samples=at.samples_consumed, resume_checkpoint=start.path if start else None)
