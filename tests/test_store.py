"""The token store: built once, the same bytes whoever builds it, whole or absent, refused under another
tokenizer; sources (text files, parquet, save_to_disk dirs) and weighted mixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import compose_job
from tp2d_exp.config.errors import ConfigError
from tp2d_exp.config.schema import DataSource
from tp2d_exp.config.spec import text_files
from tp2d_exp.data import sources
from tp2d_exp.data.build import ensure_store
from tp2d_exp.data.mixture import Mixture, quotas
from tp2d_exp.data.order import BatchOrder
from tp2d_exp.data.sources import Source
from tp2d_exp.data.store import Layout, TokenStore, open_store, token_dtype
from tp2d_exp.data.synthetic import documents
from tp2d_exp.testing.jobs import ROOT

PACKED = Layout(seq_length=64, packing=True, dataset_percentage=100, val_fraction=0.05)


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    from tp2d_exp.data.tokenizer import project_bpe_dir

    return project_bpe_dir(str(ROOT / "outputs" / "cache"), 8192)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: str):
    from tp2d_exp.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A text corpus of a few hundred KB with varied lines, empty ones and Windows line ends included."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    docs = documents(1200, seed=11)
    path.write_bytes(("\n".join(docs[:600]) + "\n\n\r\n" + "\r\n".join(docs[600:]) + "\n").encode())
    return path


def text_source(path: Path) -> Source:
    return Source(key="data", kind=DataSource.text_files, path=str(path), files=tuple(text_files(str(path))))


def reference_packing(docs: list[str], tok, seq: int) -> np.ndarray:
    """The packing the store must equal: every document's tokens and an EOS, back to back in document order,
    cut into blocks (one stream for the whole split, not per shard)."""
    stream = [t for ids in tok(docs, add_special_tokens=False)["input_ids"] for t in (*ids, tok.eos_token_id)]
    n = len(stream) // seq
    return np.array(stream[:n * seq]).reshape(n, seq)


def test_the_store_is_the_same_bytes_across_runs_and_process_counts(tmp_path, corpus, tokenizer, monkeypatch):
    """One process, two processes (spawned pool, many small batches) and a rebuild: the same files and
    digest; and exactly the global-stream packing of the documents, held-out tail apart."""
    monkeypatch.setattr(sources, "BATCH_CHARS", 20_000)  # ~20 parts, so the pool's order of completion varies
    built = {}
    for name, processes in (("one", 1), ("two", 2), ("again", 2)):
        path, meta = ensure_store(text_source(corpus), tokenizer, PACKED, tmp_path / name, workers=processes)
        assert not meta.reused and meta.built_by == f"local, {processes} process" + ("es" if processes > 1 else "")
        built[name] = path
    files = {name: {f.name: f.read_bytes() for f in p.iterdir() if f.suffix in (".bin", ".len")}
             for name, p in built.items()}
    assert files["one"] == files["two"] == files["again"] and set(files["one"]) == {"train.bin", "heldout.bin"}
    digests = {n: (TokenStore(p).digest, TokenStore(p, "heldout").digest) for n, p in built.items()}
    assert digests["one"] == digests["two"] == digests["again"]

    docs = [line for line in corpus.read_bytes().decode().splitlines() if line.strip()]
    held = int(np.ceil(len(docs) * PACKED.val_fraction))
    train, heldout = TokenStore(built["one"]), TokenStore(built["one"], "heldout")
    assert np.array_equal(train.ids, reference_packing(docs[:-held], tokenizer, 64))
    assert np.array_equal(heldout.ids, reference_packing(docs[-held:], tokenizer, 64))
    assert train.meta.documents == len(docs) and train.meta.dtype == "uint16"

    path, meta = ensure_store(text_source(corpus), tokenizer, PACKED, tmp_path / "one")
    assert meta.reused and path == built["one"]


def test_token_ids_past_16_bits_are_stored_as_uint32(tmp_path):
    from tests.test_data import word_store

    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(151_936) == np.uint32  # Qwen2's vocab
    store = word_store(tmp_path, ["70000 151935 3", "65536 2"], seq_length=3, packing=True, vocab_size=151_936)
    assert store.meta.dtype == "uint32"
    assert store.input_ids.tolist() == [[70000, 151935, 3], [0, 65536, 2]]


def test_a_failed_build_leaves_no_store_and_the_next_build_is_whole(tmp_path, corpus, tokenizer, monkeypatch):
    import tp2d_exp.data.build as build

    monkeypatch.setattr(sources, "BATCH_CHARS", 20_000)
    real, calls = build.tokenize_part, []

    def dies_on_the_third_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "tokenize_part", dies_on_the_third_part)
    root = tmp_path / "stores"
    (root / ".stale.building-1").mkdir(parents=True)  # what a killed build of another store left
    with pytest.raises(KeyboardInterrupt):
        ensure_store(text_source(corpus), tokenizer, PACKED, root, workers=1)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == [".stale.building-1"]
    monkeypatch.setattr(build, "tokenize_part", real)
    path, meta = ensure_store(text_source(corpus), tokenizer, PACKED, root, workers=1)
    assert not meta.reused and (path / "meta.json").exists()
    assert TokenStore(path).digest == TokenStore(ensure_store(text_source(corpus), tokenizer, PACKED,
                                                              tmp_path / "fresh", workers=1)[0]).digest


@pytest.mark.slow  # several store builds and job compositions: the quick loop's budget
def test_a_store_written_by_another_tokenizer_is_refused(tmp_path, corpus, tokenizer_dir):
    """Its ids would mean other text: refused in one line, directly and as data.source=store of a run."""
    other = tmp_path / "other_tokenizer"
    shutil.copytree(tokenizer_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-50]  # a different tokenizer of the same vocab size
    (other / "tokenizer.json").write_text(json.dumps(spec))

    built = compose_job(tmp_path, ["data=text_files", f"data.path={corpus}", "data.seq_length=64",
                                   f"data.store_dir={tmp_path / 'stores'}"])
    store = built.resolved.stores[0]
    reused = compose_job(tmp_path, ["data.source=store", f"data.path={store.path}", "data.seq_length=64",
                                    "data.val_fraction=0"])
    assert reused.resolved.data_digest == built.resolved.data_digest and reused.resolved.stores[0].reused
    with pytest.raises(ConfigError, match=r"^data.path: the token store .* was written by another tokenizer"):
        compose_job(tmp_path, ["data.source=store", f"data.path={store.path}", "data.seq_length=64",
                               "data.val_fraction=0", f"model.tokenizer={other}"])
    with pytest.raises(ConfigError, match=r"^data.seq_length=128 but the token store data.path=.* was built with "
                                          r"seq_length=64"):
        compose_job(tmp_path, ["data.source=store", f"data.path={store.path}", "data.seq_length=128",
                               "data.val_fraction=0"])
    with pytest.raises(ConfigError, match="another tokenizer"):
        open_store(Path(store.path), "train", "not-this-one", "data")


@pytest.mark.slow  # several store builds and job compositions: the quick loop's budget
def test_parquet_dirs_and_save_to_disk_dirs_load_as_the_same_documents(tmp_path, corpus, tokenizer):
    """The corpus as .txt, as a dir of two parquet files, as a saved Dataset and a saved DatasetDict's split:
    one store content."""
    import datasets
    import pandas as pd

    lines = corpus.read_bytes().decode().splitlines()
    (tmp_path / "pq").mkdir()
    half = len(lines) // 2
    for i, part in enumerate((lines[:half], lines[half:])):
        pd.DataFrame({"body": part, "n": range(len(part))}).to_parquet(tmp_path / "pq" / f"part-{i}.parquet")
    datasets.Dataset.from_dict({"body": lines}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"body": lines})}).save_to_disk(
        str(tmp_path / "saved_dict"))
    layout = Layout(seq_length=64, packing=True, dataset_percentage=100, val_fraction=0)
    variants = {
        "txt": text_source(corpus),
        "parquet": Source(key="data", kind=DataSource.text_files, path=str(tmp_path / "pq"), text_field="body",
                          files=tuple(text_files(str(tmp_path / "pq")))),
        "saved": Source(key="data", kind=DataSource.hf, hf_name=str(tmp_path / "saved"), text_field="body"),
        "saved_dict": Source(key="data", kind=DataSource.hf, hf_name=str(tmp_path / "saved_dict"), split="validation",
                             text_field="body"),
    }
    digests = {name: TokenStore(ensure_store(src, tokenizer, layout, tmp_path / name)[0]).digest
               for name, src in variants.items()}
    assert len(set(digests.values())) == 1, digests
    with pytest.raises(ConfigError, match=r"^data.text_field='text' is not a column of .*saved \(columns: \['body'\]\)"):
        ensure_store(Source(key="data", kind=DataSource.hf, hf_name=str(tmp_path / "saved")), tokenizer, layout,
                     tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"^data.split='train' is not a split of the saved dataset"):
        ensure_store(Source(key="data", kind=DataSource.hf, hf_name=str(tmp_path / "saved_dict"), text_field="body"),
                     tokenizer, layout, tmp_path / "bad")
    assert not [p for p in (tmp_path / "bad").iterdir() if not p.name.endswith(".lock")]  # nothing half-written


def test_quotas_are_proportional_and_exact():
    assert quotas([3, 1], 8) == [6, 2] and sum(quotas([1, 1, 1], 100)) == 100
    assert quotas([0.5, 0.3, 0.2], 10_001) == [5001, 3000, 2000]


def test_a_mixture_draws_each_source_by_weight_the_same_way_on_every_mesh(tmp_path):
    """Three stores of 40, 300 and 5000 samples weighted 5:3:2 over a 12000-sample epoch: within 2 points
    of each weight over the first 10k samples; the small source wraps (its passes counted); and every mesh
    trains each global batch on the same samples."""
    from tests.test_data import word_store

    stores = [word_store(tmp_path / str(n), [" ".join([str(s + 1)] * 3) for _ in range(n)], seq_length=4,
                         packing=False) for s, n in enumerate((40, 300, 5000))]
    mix = Mixture(stores, [5, 3, 2], ["a", "b", "c"], length=12_000)
    order = BatchOrder(num_samples=len(mix), global_batch_size=16, micro_batch_size=4, dp=4, seed=7)
    first = order.order(0)[:10_000].numpy()
    src, idx = mix.locate(first)
    shares = np.bincount(src, minlength=3) / len(src)
    assert np.all(np.abs(shares - [0.5, 0.3, 0.2]) < 0.02), shares
    assert (idx[src == 0] < 40).all() and len(np.unique(idx[src == 0])) == 40  # wrapped: every sample, many times
    batch = mix.batch(torch.as_tensor(first[:8]))
    assert batch.input_ids[:, 0].tolist() == (src[:8] + 1).tolist()  # each row holds its own source's tokens
    assert mix.passes(1, first[:0]) == {"a": 6000 / 40, "b": 3600 / 300, "c": round(2400 / 5000, 4)}
    # The large source's 2400 positions an epoch go on where the last epoch stopped: epochs 0 and 1 read
    # samples 0..2399 and 2400..4799 of it, and epoch 2 wraps to 4800..4999, 0..2199.
    large = np.arange(mix.starts[2], mix.starts[3])
    assert [mix.locate(large, e)[1][[0, -1]].tolist() for e in range(3)] == [[0, 2399], [2400, 4799], [4800, 2199]]

    def global_batches(dp: int) -> list[list[int]]:
        o = BatchOrder(num_samples=len(mix), global_batch_size=16, micro_batch_size=16 // dp, dp=dp, seed=7)
        return [torch.cat([mix.batch(i).input_ids for r in range(dp) for i in o.micro_batches(0, s, r)]).tolist()
                for _, s in list(o.steps(0, 0, 1))[:20]]

    assert global_batches(1) == global_batches(2) == global_batches(4)


@pytest.mark.slow  # several store builds and job compositions: the quick loop's budget
def test_a_mixture_job_composes_and_bad_mixtures_fail_in_one_line(tmp_path, corpus):
    """data.source=mixture of a text file and the synthetic corpus: one store each, an epoch of their summed
    samples, a mixture digest; a weight <= 0, a missing path and a text field a source lacks each fail in one
    line naming the entry's key."""
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in documents(200, seed=5)))
    mix = ("data.mixture=[{path: %s, weight: 3}, {source: synthetic, synthetic_documents: 300, weight: 1}]" % corpus)
    job = compose_job(tmp_path, ["data.source=mixture", mix, "data.seq_length=64"])
    stores = job.resolved.stores
    assert [s.key for s in stores] == ["data.mixture[0]", "data.mixture[1]"] and [s.weight for s in stores] == [3, 1]
    assert job.resolved.num_samples == sum(s.samples for s in stores)
    assert job.resolved.data_digest not in {TokenStore(Path(s.path)).digest for s in stores}
    assert job.resolved.num_heldout_samples == sum(s.heldout_samples for s in stores) > 0
    cases = {
        "data.mixture=[{path: %s, weight: 0}]" % corpus: r"^data.mixture\[0\].weight=0.0 must be positive",
        "data.mixture=[{path: %s}, {path: %s/none.txt}]" % (corpus, tmp_path):
            r"^data.mixture\[1\].path='.*none.txt' matches no .txt/.jsonl/.json/.parquet file",
        "data.mixture=[{path: %s}, {path: %s, text_field: text}]" % (corpus, tmp_path / "rows.jsonl"):
            r"^data.mixture\[1\].text_field='text' is not a column of .*rows.jsonl \(columns: \['body'\]\)",
        "data.mixture=[]": r"^data.source=mixture but data.mixture is empty",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            compose_job(tmp_path, ["data.source=mixture", override, "data.seq_length=64"])


def test_text_files_are_cut_into_lines_as_splitlines_cuts_the_whole_text(tmp_path, monkeypatch):
    """Read a few characters at a time (chunk edges inside "\\r\\n", inside a line, on a break), a file gives
    the lines `str.splitlines` gives for all of it: what Ray Data's read_text gives the Ray build."""
    import random

    monkeypatch.setattr(sources, "TEXT_CHUNK_CHARS", 7)
    rng = random.Random(0)
    pieces = ["a", "bc", " ", "é", "\n", "\r\n", "\r", "\x0c", "\u2028", "\x85", "  \n"]
    for trial in range(50):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        path = tmp_path / f"{trial}.txt"
        path.write_bytes(text.encode())
        assert list(sources.text_lines(str(path))) == text.splitlines(), repr(text)


@pytest.mark.slow  # a moto server start
def test_a_corpus_on_object_storage_builds_its_local_copys_store(tmp_path, corpus, monkeypatch):
    """data.path=s3://bucket/corpus/ (a moto S3 server on 127.0.0.1): listed, sniffed and read through fsspec;
    the store is memory-mapped locally and holds what the same files on disk give."""
    import s3fs

    from tp2d_exp.testing.s3_server import S3Server

    local = tmp_path / "corpus"
    local.mkdir()
    shutil.copy(corpus, local / "a.txt")
    (local / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in documents(100, seed=9)))
    with S3Server() as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec would reuse a filesystem of an earlier test's endpoint
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.put(str(local) + "/", f"{s3.bucket}/corpus/", recursive=True)
        overrides = ["data=text_files", "data.seq_length=64", f"data.store_dir={tmp_path / 'stores'}"]
        remote = compose_job(tmp_path, [*overrides, f"data.path={s3.uri('corpus/')}"])
        assert remote.resolved.data_files == (s3.uri("corpus/a.txt"), s3.uri("corpus/b.jsonl"))
        with pytest.raises(ConfigError, match=r"^data.path='s3://tp2d/nothing/' matches no .txt/.jsonl"):
            compose_job(tmp_path, [*overrides, f"data.path={s3.uri('nothing/')}"])
    on_disk = compose_job(tmp_path, [*overrides, f"data.path={local}"])
    assert remote.resolved.data_digest == on_disk.resolved.data_digest
    assert remote.resolved.stores[0].path != on_disk.resolved.stores[0].path  # two sources, one content


def test_a_runs_passes_over_each_source_count_whole_epochs_and_the_consumed_part_of_this_one(tmp_path):
    """What summary.json's source_passes holds at the end of a run (tp2d_exp.train.loop.source_passes)."""
    from types import SimpleNamespace

    from tests.test_data import word_store
    from tp2d_exp.checkpoint.manager import Progress
    from tp2d_exp.train.loop import source_passes

    stores = [word_store(tmp_path / str(n), [f"{n} 1 2"] * n, seq_length=4, packing=False) for n in (10, 30)]
    mix = Mixture(stores, [1, 1], ["small", "large"], length=40)  # quotas 20 and 20
    order = BatchOrder(num_samples=40, global_batch_size=8, micro_batch_size=8, dp=1, seed=1)
    t = SimpleNamespace(dataset=mix, order=order)
    first = order.order(2)[:16].numpy()
    small = int((mix.locate(first)[0] == 0).sum())
    passes = source_passes(t, Progress(epoch=2, sample_in_epoch=16))
    assert passes == {"small": round((2 * 20 + small) / 10, 4), "large": round((2 * 20 + 16 - small) / 30, 4)}
    assert source_passes(SimpleNamespace(dataset=stores[0], order=order), Progress()) is None
