"""Write a mesh sweep's report: report.md, report.json, plots/*.png and (when the sweep used W&B) a W&B table.

    python scripts/sweep_report.py outputs/multirun/2026-11-24/10-00-00
    python scripts/sweep_report.py <sweep dir> --no-wandb

`python run.py -m ...` already writes it when the sweep ends (tp2d_exp.perf.report.SweepReport); run this to
rebuild it, e.g. after editing job dirs or for a sweep whose callback was off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tp2d_exp, not an installed one

from tp2d_exp.perf.report import write_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir holding one job dir per mesh (0/, 1/, ...)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    try:
        report = write_report(args.sweep_dir, use_wandb=not args.no_wandb)
    except FileNotFoundError as e:
        parser.error(str(e))
    print(report.read_text())
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
