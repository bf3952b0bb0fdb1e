"""Tokenizers: a Hugging Face one by hub id or dir, or the project's own byte-level BPE built offline.

The project's BPE is trained on the English word list and synthetic corpus (tp2d_exp.data.synthetic) with a
vocab of thousands, so it splits text at roughly the granularity of real LLM tokenizers: common words are
one token, rare ones a few subwords, nothing is ever unknown (byte fallback). Building it is
deterministic and idempotent: the same version and vocab size always give the same files.
"""

from __future__ import annotations

from pathlib import Path

from tp2d_exp.data import synthetic
from tp2d_exp.storage import atomic_write, file_lock

BPE_VERSION = 1
EOS = "<|endoftext|>"


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
    with atomic_write(out) as tmp:
        hf.save_pretrained(str(tmp))


def load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path_or_id)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path_or_id!r} has no EOS token; packing needs one to separate documents")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
