"""The thin Ray adapter of the checkpoint manager: tell Ray Train about a committed checkpoint.

Reported only after the commit (tp2d_exp.checkpoint.manager), so Ray's retention (num_to_keep) never deletes
the newest intact checkpoint before a newer one is whole.
"""

from __future__ import annotations

from typing import Optional

from tp2d_exp.records import StepRow


def report_checkpoint(path: str, row: Optional[StepRow]) -> None:
    """Every rank reports the checkpoint (already in the Ray run dir: no upload) with the last log row."""
    import ray.train

    ray.train.report(row.flat() if row else {}, checkpoint=ray.train.Checkpoint(path),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
