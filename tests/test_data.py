"""Data: what each rank trains on, and how text becomes samples."""

from __future__ import annotations

import torch

from tests.conftest import run_distributed
from tp2d_exp.config.schema import DataSource
from tp2d_exp.config.spec import text_files
from tp2d_exp.data.batch import IGNORE_INDEX, document_positions
from tp2d_exp.data.encode import Part
from tp2d_exp.data.order import BatchOrder


def epoch_token_ids(job) -> list[torch.Tensor]:
    """On each rank: the token ids it trains on at every step of epoch 0, as the train loop slices them."""
    import torch.distributed as dist

    from tp2d_exp.data.dataset import open_samples
    from tp2d_exp.train.mesh import gather_placement

    ds = open_samples(job)
    order = BatchOrder.of(job)
    dp_rank = gather_placement(job.dims, "one-node").coordinate(dist.get_rank())[0]  # as setup() places ranks
    return [torch.cat([ds.batch(i).input_ids for i in order.micro_batches(0, start, dp_rank)])
            for _, start in order.steps(0, 0, num_epochs=1)]


def test_tp_ranks_share_batches_and_dp_ranks_never_share_samples(job_factory):
    job = job_factory(["parallelism=tp2_dp2", "run.batch_size_per_gpu=4", "data.synthetic_documents=300", "data.val_fraction=0"])
    ranks = run_distributed(epoch_token_ids, 4, job)
    steps = len(ranks[0])
    assert steps >= 3
    for s in range(steps):
        assert torch.equal(ranks[0][s], ranks[1][s])  # dp group 0 = ranks 0, 1 (tp innermost)
        assert torch.equal(ranks[2][s], ranks[3][s])  # dp group 1 = ranks 2, 3
    # Packed samples are distinct token blocks, so disjoint samples mean no shared rows within the epoch.
    seen0 = {tuple(r.tolist()) for s in range(steps) for r in ranks[0][s]}
    seen1 = {tuple(r.tolist()) for s in range(steps) for r in ranks[2][s]}
    assert seen0.isdisjoint(seen1)
    assert len(seen0) == len(seen1) == steps * 4


def test_global_batches_do_not_depend_on_the_mesh(job_factory):
    """tp1_dp4 and tp2_dp2 (and one process) with the same global batch train on the same global batches."""
    by_mesh = {}
    for tp, dp in [(1, 4), (2, 2), (1, 1)]:
        job = job_factory([f"parallelism=tp{tp}_dp{dp}", "run.global_batch_size=8", f"run.batch_size_per_gpu={8 // dp}",
                           "data.synthetic_documents=300", "data.val_fraction=0"])
        ranks = run_distributed(epoch_token_ids, tp * dp, job)
        # The global batch is the dp ranks' shares in dp order: ranks 0, tp, 2*tp, ...
        by_mesh[(tp, dp)] = [torch.cat([ranks[d * tp][s] for d in range(dp)]) for s in range(len(ranks[0]))]
    for s, batch in enumerate(by_mesh[(1, 1)]):
        assert torch.equal(by_mesh[(1, 4)][s], batch)
        assert torch.equal(by_mesh[(2, 2)][s], batch)


def test_global_batch_order_is_reshuffled_each_epoch_and_repeatable():
    order = BatchOrder(num_samples=100, global_batch_size=10, micro_batch_size=5, dp=2, seed=3)
    assert torch.equal(order.order(0), BatchOrder(100, 10, 5, 2, 3).order(0))
    assert not torch.equal(order.order(0), order.order(1))
    assert order.steps_per_epoch == 10 and len(order.micro_batches(0, 0, dp_rank=1)) == 1  # no accumulation
    assert sorted(torch.cat([order.global_batch(0, s) for _, s in order.steps(0, 0, 1)]).tolist()) == list(range(100))


def word_store(tmp_path, docs: list[str], seq_length: int, packing: bool, vocab_size: int = 100):
    """A store of documents whose tokens are the numbers written in them (EOS = pad = 0), through the same
    writer the builder uses, so packing's arithmetic can be checked exactly."""
    import numpy as np

    from tp2d_exp.data.store import StoreMeta, TokenStore, install, token_dtype, write_splits

    dtype = token_dtype(vocab_size)
    ids = [np.array([int(w) for w in d.split()], dtype) for d in docs]
    tmp, out = tmp_path / "building", tmp_path / "store"
    tmp.mkdir(parents=True)
    np.concatenate(ids).tofile(tmp / "p.tok")
    np.array([len(i) for i in ids], np.uint32).tofile(tmp / "p.len")
    meta = StoreMeta(version=1, source="words", tokenizer="words", vocab_size=vocab_size, dtype=str(dtype),
                     seq_length=seq_length, packing=packing, pad_id=0, eos_id=0, splits={})
    meta.splits = write_splits([Part(str(tmp / "p"), len(ids), sum(map(len, ids)))], tmp, meta, 0)
    install(tmp, out, meta)
    return TokenStore(out)


def test_packing_has_no_padding_and_loses_only_the_final_partial_block(tmp_path):
    docs = ["1 2 3", "4 5", "6 7 8 9 10", "11"]  # 11 tokens + 4 EOS = 15
    ds = word_store(tmp_path, docs, seq_length=4, packing=True)
    assert ds.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]  # last 3 tokens: partial block
    batch = ds.batch(torch.arange(len(ds)))
    assert (batch.labels != IGNORE_INDEX).all() and batch.attention_mask.all()


def test_document_positions_restart_after_every_eos(tmp_path):

    ds = word_store(tmp_path, ["1 2 3", "4 5", "6 7 8 9 10", "11"], seq_length=4, packing=True)
    # Blocks [1 2 3 EOS] [4 5 EOS 6] [7 8 9 10]: a block's first token starts a position count (it may be the
    # middle of a document cut by the block boundary, which then attends within the block only).
    ids = ds.batch(torch.arange(len(ds))).input_ids
    assert document_positions(ids, ds.eos_id).tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]


def test_attention_within_documents_sees_each_document_alone(job_factory):
    """A packed block with data.attention_within_documents gives every document the logits it has alone (HF
    builds the block-diagonal causal mask from the restarted position ids); plain packing lets the second
    document attend to the first."""
    from transformers import AutoModelForCausalLM

    from tp2d_exp.train.materialize import hf_config

    arch = job_factory([], prepare=False).arch
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(arch), attn_implementation="sdpa").eval()
    eos = 0
    first, second = torch.randint(1, 8192, (1, 7)), torch.randint(1, 8192, (1, 9))
    block = torch.cat([first, torch.tensor([[eos]]), second], dim=1)
    with torch.no_grad():
        alone = model(input_ids=second).logits
        within = model(input_ids=block, position_ids=document_positions(block, eos)).logits[:, 8:]
        across = model(input_ids=block).logits[:, 8:]
    torch.testing.assert_close(within, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(across, alone, atol=1e-3)


def test_padding_mode_masks_padding_out_of_the_loss(tmp_path):
    ds = word_store(tmp_path, ["1 2 3", "4 5", "6 7 8 9 10", "11"], seq_length=4, packing=False)
    batch = ds.batch(torch.arange(len(ds)))
    assert batch.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]  # "11" is too short
    assert (batch.labels == IGNORE_INDEX).sum() == 3
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_project_tokenizer_is_subword_bpe_and_deterministic(tmp_path):
    from tp2d_exp.data.tokenizer import load_tokenizer, project_bpe_dir

    a = project_bpe_dir(str(tmp_path / "a"), 8192)
    b = project_bpe_dir(str(tmp_path / "b"), 8192)
    assert (tmp_path / "a" / "bpe-v1-8192" / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / "bpe-v1-8192" / "tokenizer.json").read_bytes()
    tok = load_tokenizer(a)
    assert len(tok) == 8192
    text = "The government announced a new policy for the city in 1998, after the election."
    ids = tok(text)["input_ids"]
    # Subword granularity: about one token per common word, far fewer tokens than characters.
    assert len(text.split()) <= len(ids) <= 1.6 * len(text.split())
    assert tok.decode(ids) == text
    assert load_tokenizer(b)(text)["input_ids"] == ids


def test_text_files_read_txt_jsonl_and_parquet_from_a_dir_or_glob(tmp_path):
    import pandas as pd

    from tp2d_exp.data.sources import Source, count_documents, documents

    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "a.jsonl").write_text('{"body": "json one"}\n{"body": "json two"}\n')
    pd.DataFrame({"body": ["pq one", "", "pq two"]}).to_parquet(tmp_path / "a.parquet")

    def docs(path: str, **over) -> list[str]:  # data.path as a dir, a glob or a file
        src = Source(key="data", kind=DataSource.text_files, path=path, files=tuple(text_files(path)), **over)
        return [d for batch in documents(src) for d in batch]

    assert docs(str(tmp_path / "txt")) == ["first line", "second line"]
    assert docs(str(tmp_path / "*.jsonl"), text_field="body") == ["json one", "json two"]
    assert docs(str(tmp_path / "a.parquet"), text_field="body") == ["pq one", "pq two"]
    src = Source(key="data", kind=DataSource.text_files, path="txt", files=tuple(text_files(str(tmp_path / "txt"))))
    assert count_documents(src) == 2 and list(documents(src, limit=1)) == [["first line"]]
