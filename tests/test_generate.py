"""scripts/generate.py on a tiny random Qwen2 with the project's tokenizer: as an HF dir, and as a checkpoint
dir laid out as export_hf reads run.py's (DCP shards keyed model.<FQN>, hf/, commit.json), which the script
exports first. No Ray: the checkpoint is written in this process."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROMPT = "The river"


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "scripts/generate.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tp2d_exp.checkpoint.manager import HF_DIR
    from tp2d_exp.checkpoint.store import FileRecord, commit, crc32, list_files, storage_writer
    from tp2d_exp.data.tokenizer import project_bpe_dir

    tokenizer = AutoTokenizer.from_pretrained(project_bpe_dir(str(ROOT / "outputs" / "cache"), 8192))
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                  max_position_embeddings=256, tie_word_embeddings=True,
                                  bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    root = tmp_path_factory.mktemp("generate")
    hf, ckpt = root / "hf", root / "checkpoint_0000004"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    # What export_hf reads of a run.py checkpoint: the model's tensors by FQN, hf/ and a commit.json over all.
    with warnings.catch_warnings():  # DCP says it assumes one process: it is one here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict()}, storage_writer=storage_writer(str(ckpt)), no_dist=True)
    config.save_pretrained(ckpt / HF_DIR)
    tokenizer.save_pretrained(ckpt / HF_DIR)
    commit(str(ckpt), {name: FileRecord(size, crc32(str(ckpt / name))) for name, size in list_files(str(ckpt)).items()})
    return {"hf": hf, "checkpoint": ckpt}


# Two interpreters loading torch and transformers (about 12 s of CPU here): slow tier.
@pytest.mark.slow
def test_greedy_text_is_the_same_from_the_hf_dir_and_from_the_checkpoint(model_dirs):
    """Two runs of greedy decoding on the same weights, one through the export path: the same text, the
    prompt continued. Both at once: each is mostly start-up."""
    runs = [start(str(model_dirs[kind]), "--prompt", PROMPT, "--max-new-tokens", "8", "--greedy")
            for kind in ("hf", "checkpoint")]
    from_hf, from_checkpoint = (finish(p) for p in runs)
    for proc in (from_hf, from_checkpoint):
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert from_hf.stdout == from_checkpoint.stdout
    text = from_hf.stdout.rstrip("\n")
    assert text.startswith(PROMPT) and text[len(PROMPT):].strip()


@pytest.mark.parametrize("source,says", [
    ("missing", "does not exist"),
    ("plain_dir", "is neither a checkpoint dir nor a Hugging Face model dir"),
    ("config_only", "is neither a checkpoint dir nor a Hugging Face model dir"),  # like a checkpoint's hf/
])
def test_a_bad_source_is_one_line_and_exit_2(tmp_path, source, says):
    """Found before torch loads: well under a second each."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "qwen2"}')
    path = {"missing": tmp_path / "missing", "plain_dir": tmp_path, "config_only": tmp_path / "hf"}[source]
    proc = finish(start(str(path), "--prompt", PROMPT))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and says in proc.stderr and str(path) in proc.stderr
