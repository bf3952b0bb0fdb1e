"""Held-out loss and perplexity of a checkpoint, on any mesh, through the normal launcher (Ray workers).

    python scripts/evaluate.py outputs/ray/<run name>/checkpoint_0000040 parallelism=tp1_dp4
    python scripts/evaluate.py <run name> run.eval_samples=0              # its newest checkpoint, the whole split
    python scripts/evaluate.py s3://bucket/ray/<run>/checkpoint_0000040 data=text_files data.path=other.txt \
        data.val_fraction=0.1                                              # another corpus's held-out share

Overrides are run.py's (Hydra); give the data.* settings the run trained with to score its own held-out
split. Prints the loss and writes eval.json into its own run dir (outputs/evals/<date>/<time>, or --out).
Exit codes as run.py: 2 when nothing started (a bad value, a checkpoint that does not fit), 1 when it failed.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tp2d_exp.config.errors import ConfigError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint dir, a run dir, or a run name under cluster.storage_path "
                                           "(its newest intact checkpoint); a path or a URI")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py (parallelism=..., data.*=...)")
    parser.add_argument("--out", type=Path, help="the run dir (default: outputs/evals/<date>/<time>)")
    args = parser.parse_args()
    out = (args.out or ROOT / "outputs" / "evals" / f"{datetime.now():%Y-%m-%d}" / f"{datetime.now():%H-%M-%S}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import logging

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tp2d_exp.driver.evaluate import EvaluationFailed, evaluate_checkpoint

    logging.basicConfig(filename=out / "evaluate.log", level=logging.INFO,
                        format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    try:
        report = evaluate_checkpoint(args.checkpoint, args.overrides, out)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    except EvaluationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if e.never_started else 1) from None
    print(f"{report.checkpoint} (step {report.step}) on tp{report.mesh.tp}_dp{report.mesh.dp}: held-out loss "
          f"{report.val_loss:.6f}, perplexity {report.val_ppl:.3f} over {report.val_samples} samples "
          f"({report.val_tokens} tokens); {out / 'eval.json'}")


if __name__ == "__main__":
    main()
