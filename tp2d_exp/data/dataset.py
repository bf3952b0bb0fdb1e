"""A job's samples: the token store of each of its sources (built by the driver before any worker starts,
tp2d_exp.data.build), seen as one sample space: a single store, or the weighted mixture of several
(tp2d_exp.data.mixture). What order the samples are trained in is tp2d_exp.data.order's job."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from tp2d_exp.config.errors import ConfigError
from tp2d_exp.config.schema import DataConfig, DataSource, MixtureSource
from tp2d_exp.data.mixture import Mixture
from tp2d_exp.data.sources import Source
from tp2d_exp.data.store import Layout, StoreMeta, TokenStore, open_store
from tp2d_exp.records import StoreRecord

if TYPE_CHECKING:
    from tp2d_exp.config.spec import JobSpec

Samples = Union[TokenStore, Mixture]


class Split(StrEnum):
    train = "train"
    heldout = "heldout"  # data.val_fraction's documents: evaluated, never trained on


def sources(spec: JobSpec) -> list[Source]:
    """The job's sources: `data` itself, or each entry of `data.mixture`."""
    from tp2d_exp.config.spec import text_files

    d = spec.data
    if d.source is DataSource.mixture:
        return [_source(f"data.mixture[{i}]", m, tuple(text_files(m.path)) if m.path else ())
                for i, m in enumerate(d.mixture)]
    return [_source("data", d, spec.resolved.data_files)]


def _source(key: str, c: Union[DataConfig, MixtureSource], files: tuple[str, ...]) -> Source:
    return Source(key=key, kind=c.source, files=files if c.source is DataSource.text_files else (), path=c.path,
                  hf_name=c.hf_name, hf_config=c.hf_config, split=c.split, text_field=c.text_field,
                  streaming=c.streaming, synthetic_documents=c.synthetic_documents,
                  weight=getattr(c, "weight", 1.0))


def layout(data: DataConfig) -> Layout:
    return Layout(seq_length=data.seq_length, packing=data.packing, dataset_percentage=data.dataset_percentage,
                  val_fraction=data.val_fraction)


def store_root(spec: JobSpec) -> Path:
    d = spec.data
    return Path(os.path.abspath(os.path.expanduser(d.store_dir))) if d.store_dir else \
        Path(spec.resolved.cache_dir) / "stores"


def build_stores(spec: JobSpec, tok: Any, on_ray: bool = False) -> tuple[StoreRecord, ...]:
    """Each source's store, built where missing (driver side, with progress) with the job's loaded tokenizer,
    as the spec records them."""
    from tp2d_exp.data.build import ensure_store
    from tp2d_exp.data.store import tokenizer_identity

    refs = []
    for src in sources(spec):
        if src.kind is DataSource.store:
            path = Path(src.path)
            meta = open_store(path, "train", tokenizer_identity(tok), "data.path").meta
            _check_layout(meta, spec.data, path)
            meta.reused = True
        else:
            path, meta = ensure_store(src, tok, layout(spec.data), store_root(spec), on_ray=on_ray,
                                      workers=spec.data.build_processes)
        held = meta.splits.get("heldout")
        refs.append(StoreRecord(key=src.key, source=src.name, path=str(path), weight=src.weight,
                             tokenizer=meta.tokenizer, tokens=meta.splits["train"].tokens,
                             samples=meta.splits["train"].samples, digest=meta.splits["train"].digest,
                             heldout_samples=held.samples if held else 0,
                             documents=meta.documents, build_s=meta.build_s, built_by=meta.built_by,
                             reused=meta.reused))
    return tuple(refs)


def _check_layout(meta: StoreMeta, data: DataConfig, path: Path) -> None:
    """A store given as data.path must have been built the way the job trains."""
    for key, want, have in (("seq_length", data.seq_length, meta.seq_length), ("packing", data.packing, meta.packing),
                            ("val_fraction", data.val_fraction > 0, "heldout" in meta.splits)):
        if want != have:
            raise ConfigError(f"data.{key}={getattr(data, key)} but the token store data.path={str(path)!r} was built "
                              f"with {key}={have}; set data.{key} to match or build a store for this job")


def open_samples(spec: JobSpec, split: Split = Split.train) -> Samples:
    """The job's samples of one split, memory-mapped from the stores the driver built and recorded in the
    spec (on a cluster data.store_dir is a filesystem every node sees: checked before the build)."""
    refs = spec.resolved.stores
    stores = []
    for ref in refs:
        path = Path(ref.path)
        if not (path / "meta.json").exists():
            raise ConfigError(f"{ref.key}: the token store {path} the driver built is not here; data.store_dir must "
                              "be a filesystem every node mounts at the same path (or it was deleted: run again)")
        stores.append(open_store(path, str(split), ref.tokenizer, ref.key))
    if len(stores) == 1:
        return stores[0]
    if any(len(s) == 0 for s in stores):
        empty = next(ref.key for ref, s in zip(refs, stores) if len(s) == 0)
        raise ConfigError(f"{empty}: its {split} split has no sample of data.seq_length={spec.data.seq_length}; "
                          "give it more text or drop it from data.mixture")
    return Mixture(stores, [r.weight for r in refs], [r.key for r in refs],
                   length=spec.data.mixture_samples if split is Split.train else 0,
                   spread=split is Split.heldout)
