"""Generate text from a trained model: a checkpoint dir of run.py or a dir written by scripts/export_hf.py.

    python scripts/generate.py outputs/ray/<run name>/checkpoint_0000040 --prompt "The river"
    python scripts/generate.py exported/ --prompt "The river" --top-p 0.9 --temperature 0.8 --seed 1

A checkpoint (a path or an s3:// URI) is exported to a temporary HF dir by the code scripts/export_hf.py runs,
so the text comes from exactly what a user would load; then plain transformers: AutoModelForCausalLM,
AutoTokenizer and `generate`. Greedy unless --top-p or --temperature asks for sampling. Prints the prompt and
its continuation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tp2d_exp, not an installed one

# Light imports only (torch and transformers load after the checks), so that a bad input fails in a second.
from tp2d_exp.checkpoint.store import CheckpointError, is_committed  # noqa: E402
from tp2d_exp.storage import filesystem, is_uri, join  # noqa: E402

DEFAULT_TOP_P, DEFAULT_TEMPERATURE = 0.9, 1.0


class InputError(ValueError):
    """A source or setting the script cannot use; the message is the one line it prints."""


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    sample: bool  # False: greedy
    top_p: float
    temperature: float
    seed: int


def is_checkpoint(path: str) -> bool:
    """A run.py checkpoint dir (its commit marker or DCP's metadata), on a path or a URI; export_hf verifies it."""
    fs, metadata = filesystem(join(path, ".metadata"))
    return is_committed(path) or fs.isfile(metadata)


def is_hf_model_dir(path: str) -> bool:
    """A local dir with a model config and weights (a checkpoint's hf/ has the config but no weights)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        name.endswith((".safetensors", ".bin")) for name in os.listdir(path))


def check_source(source: str) -> None:
    """Raise InputError unless `source` is a checkpoint dir or a local HF model dir."""
    hint = ("give a checkpoint dir (the `checkpoint` of a run's summary.json, e.g. "
            "outputs/ray/<run name>/checkpoint_0000040) or a dir written by scripts/export_hf.py")
    fs, root = filesystem(source)
    if not fs.exists(root):
        raise InputError(f"{source} does not exist; {hint}")
    if is_checkpoint(source):
        return
    if is_uri(source) or not os.path.isdir(source) or not is_hf_model_dir(source):
        raise InputError(f"{source} is neither a checkpoint dir nor a Hugging Face model dir (config.json and "
                         f"weights); {hint}")


def generate(hf_dir: str, prompt: str, decoding: Decoding) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device).eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    # A config of its own, not the model's generation_config.json: its sampling defaults (e.g. an Instruct
    # model's top_k=20) would otherwise change what --greedy or --top-p mean. top_k=0: nucleus sampling only.
    config = GenerationConfig(max_new_tokens=decoding.max_new_tokens, do_sample=decoding.sample,
                              top_p=decoding.top_p if decoding.sample else None,
                              temperature=decoding.temperature if decoding.sample else None,
                              top_k=0 if decoding.sample else None, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None
                              else tokenizer.pad_token_id)
    torch.manual_seed(decoding.seed)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def run(source: str, prompt: str, decoding: Decoding) -> str:
    check_source(source)
    if not is_checkpoint(source):
        return generate(source, prompt, decoding)
    from tp2d_exp.checkpoint.export import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        return generate(str(export_hf(source, os.path.join(tmp, "hf"))), prompt, decoding)


def decoding_of(args: argparse.Namespace) -> Decoding:
    sample = args.top_p is not None or args.temperature is not None
    if args.greedy and sample:
        raise InputError("--greedy and --top-p/--temperature contradict each other; give one or the other")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    top_p = DEFAULT_TOP_P if args.top_p is None else args.top_p
    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    if not 0 < top_p <= 1:
        raise InputError(f"--top-p={top_p} must be in (0, 1]")
    if temperature <= 0:
        raise InputError(f"--temperature={temperature} must be positive (for greedy text give --greedy)")
    return Decoding(max_new_tokens=args.max_new_tokens, sample=sample, top_p=top_p, temperature=temperature,
                    seed=args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a checkpoint dir written by run.py (a path or an s3:// URI) or an "
                                       "exported HF model dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="the most likely token each step (the default)")
    parser.add_argument("--top-p", type=float, help=f"sample from the top-p nucleus (default {DEFAULT_TOP_P} "
                                                    "when --temperature is given)")
    parser.add_argument("--temperature", type=float, help=f"sampling temperature (default {DEFAULT_TEMPERATURE} "
                                                          "when --top-p is given)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling RNG's seed")
    args = parser.parse_args()
    try:
        if not args.prompt:
            raise InputError("--prompt is empty; give the text to continue")
        print(run(args.source, args.prompt, decoding_of(args)))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (CheckpointError, OSError, ValueError, ImportError) as e:  # unreadable, or s3fs missing for s3://
        print(f"error: {args.source}: {e}".splitlines()[0], file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
