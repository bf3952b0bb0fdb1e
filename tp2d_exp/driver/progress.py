"""The console's progress bar, drawn on the driver from rank 0's metrics.jsonl (Ray's worker stdout would
mangle tqdm), so the console shows one clean bar whatever Ray logs."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from tp2d_exp.records import StepRow


class ProgressBar(threading.Thread):
    def __init__(self, metrics_path: Path, steps: int):
        """`steps`: the steps this job trains (a resumed run starts counting at its checkpoint's)."""
        super().__init__(daemon=True)
        self.path, self.total = metrics_path, steps
        self.stop = threading.Event()

    def run(self) -> None:
        from tqdm import tqdm

        bar, offset, first, val = None, 0, 0, {}
        while True:
            stopping = self.stop.wait(0.5)
            if self.path.exists():
                with open(self.path) as f:
                    f.seek(offset)
                    for line in f.readlines():
                        if not line.endswith("\n"):
                            break
                        offset += len(line.encode())
                        row = StepRow.parse(line)
                        if bar is None:  # created at the first step, so rate and ETA leave out start-up
                            first = row.step - 1
                            bar = tqdm(total=self.total, desc="train", unit="step", dynamic_ncols=True,
                                       file=sys.stderr, disable=None)
                        bar.update(row.step - first - bar.n)
                        if row.val_loss is not None:  # the last held-out loss stays in view
                            val = {"val": f"{row.val_loss:.4f}"}
                        bar.set_postfix(loss=f"{row.loss:.4f}", **val, tok_s=f"{row.tokens_per_s:.0f}")
            if stopping:
                break
        if bar is not None:
            bar.close()
