"""Tokenizers: a Hugging Face one by hub id or dir, or the project's own byte-level BPE built offline.

The project's BPE is trained on the English word list and synthetic corpus (tp2d_exp.synthetic) with a
vocab of thousands, so it splits text at roughly the granularity of real LLM tokenizers: common words are
one token, rare ones a few subwords, nothing is ever unknown (byte fallback). Building it is
deterministic and idempotent: the same version and vocab size always give the same files.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tp2d_exp import synthetic

BPE_VERSION = 1
EOS = "<|endoftext|>"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Cross-process lock so concurrent workers on one node build a cached artefact once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def project_bpe_dir(cache_dir: str, vocab_size: int) -> str:
    """Build (once) and return the dir of the project's BPE tokenizer with `vocab_size` tokens."""
    out = Path(cache_dir) / f"bpe-v{BPE_VERSION}-{vocab_size}"
    if (out / "tokenizer.json").exists():
        return str(out)
    with file_lock(Path(cache_dir) / f".bpe-v{BPE_VERSION}-{vocab_size}.lock"):
        if not (out / "tokenizer.json").exists():
            _train_bpe(out, vocab_size)
    return str(out)


def _train_bpe(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words, _ = synthetic.vocabulary()
    # Every word once (plain and capitalised) guarantees coverage; the corpus adds realistic frequencies.
    punctuation = " , . ; : ' \" ( ) - – — % $ & / ! ? , . 's n't 1 2 3 4 5 6 7 8 9 0 "
    texts = [" ".join(words), " ".join(w.capitalize() for w in words), *[punctuation] * 50,
             *synthetic.documents(2000, seed=1234)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None,
                                 model_max_length=1 << 20)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    hf.save_pretrained(str(tmp))
    os.replace(tmp, out)


def load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path_or_id)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path_or_id!r} has no EOS token; packing needs one to separate documents")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
