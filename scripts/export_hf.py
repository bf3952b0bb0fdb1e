"""Export a checkpoint dir (e.g. the `checkpoint` of a run's summary.json) as a Hugging Face model dir.

    python scripts/export_hf.py outputs/ray/<run name>/checkpoint_0000040 exported/
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('exported')"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tp2d_exp.checkpoint.store import CheckpointError  # noqa: E402
from tp2d_exp.checkpoint.export import export_hf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint dir written by run.py (a path or an s3:// URI)")
    parser.add_argument("out_dir", help="where to write config.json, the tokenizer and model.safetensors")
    args = parser.parse_args()
    try:
        out = export_hf(args.checkpoint, args.out_dir)
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
