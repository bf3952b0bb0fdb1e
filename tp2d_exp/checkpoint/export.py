"""Export a training checkpoint as a plain Hugging Face model dir: config, tokenizer and safetensors weights
that `AutoModelForCausalLM.from_pretrained` loads. Needs only the checkpoint dir (it carries the run's HF
config and tokenizer) and no process group: DCP's shards are consolidated in this process."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tp2d_exp.checkpoint.manager import HF_DIR, load_model_state
from tp2d_exp.checkpoint.store import download
from tp2d_exp.storage import join


def export_hf(checkpoint_dir: str, out_dir: str) -> Path:
    """`checkpoint_dir`: a path or a URI (s3://...)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _export(checkpoint_dir, download(join(checkpoint_dir, HF_DIR), tmp), out_dir)


def _export(checkpoint_dir: str, hf: str, out_dir: str) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(hf)
    config.use_cache = True  # training turns the KV cache off; inference wants it
    state = load_model_state(checkpoint_dir)  # verified against commit.json first
    tied = bool(config.tie_word_embeddings)
    if tied:  # the checkpoint holds the shared tensor under both names; the HF model ties them itself
        state.pop("lm_head.weight", None)
    with torch.device("meta"):  # no throwaway random init of a large model
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = set(missing) - ({"lm_head.weight"} if tied else set())
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint_dir} does not match its hf/config.json: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    out = Path(out_dir)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(hf).save_pretrained(out)
    return out
