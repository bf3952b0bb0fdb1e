"""The run's schedule counted in samples: run length, LR warmup and decay, checkpoint, log and evaluation cadence.

The `run.*_steps` settings are converted once, with the global batch size of the run's first start, and every
checkpoint of the run keeps the result. A rerun of the same run with another global batch size therefore ends
at the same sample, follows the same LR-vs-samples curve and checkpoints and logs at the same sample marks
(rounded to its own steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tp2d_exp.config.schema import RunConfig

# The run settings a same-name rerun must keep (tp2d_exp.driver.prepare): changing one midway would silently
# give the run another optimiser or another schedule. The global batch size and the mesh may change.
FIXED_SETTINGS = ("learning_rate", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "warmup_steps",
                  "lr_decay_steps", "max_steps", "num_epochs", "checkpoint_every", "log_interval", "eval_every",
                  "eval_samples")


@dataclass(frozen=True)
class Schedule:
    end_samples: int  # the run ends once this many samples are consumed (counted from the run's sample 0)
    warmup_samples: int
    decay_samples: int  # end of the cosine decay; past it the LR stays at its floor
    checkpoint_every_samples: int  # 0: at epoch ends and at the end only
    log_every_samples: int
    learning_rate: float
    min_lr_ratio: float
    eval_every_samples: int = 0  # 0: evaluate at the end only (a default: checkpoints older than evaluation)

    @classmethod
    def of(cls, run: RunConfig, global_batch_size: int, end_samples: int) -> "Schedule":
        """`end_samples`: where the data runs out (tp2d_exp.data.order.BatchOrder.end_samples), which
        run.max_steps may cut shorter."""
        if run.max_steps:
            end_samples = min(end_samples, run.max_steps * global_batch_size)
        return cls(end_samples=end_samples, warmup_samples=run.warmup_steps * global_batch_size,
                   decay_samples=run.lr_decay_steps * global_batch_size if run.lr_decay_steps else end_samples,
                   checkpoint_every_samples=run.checkpoint_every * global_batch_size,
                   log_every_samples=run.log_interval * global_batch_size,
                   learning_rate=run.learning_rate, min_lr_ratio=run.min_lr_ratio,
                   eval_every_samples=run.eval_every * global_batch_size)

    def lr(self, samples: int, global_batch_size: int) -> float:
        """The LR of a step of `global_batch_size` samples that starts after `samples`: linear warmup (the
        first step reaches batch/warmup of the peak), then cosine decay to min_lr_ratio at decay_samples."""
        if samples < self.warmup_samples:
            return self.learning_rate * min(1.0, (samples + global_batch_size) / self.warmup_samples)
        if self.decay_samples <= self.warmup_samples:
            return self.learning_rate
        progress = min(1.0, (samples - self.warmup_samples) / (self.decay_samples - self.warmup_samples))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.learning_rate * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    def steps_left(self, samples: int, global_batch_size: int) -> int:
        """Optimizer steps from `samples` to the end, at this global batch size (the data may end sooner)."""
        return max(0, -(-(self.end_samples - samples) // global_batch_size))


def crossed(every: int, before: int, after: int) -> bool:
    """Whether a step from `before` to `after` samples passed a multiple of `every` (0: never)."""
    return every > 0 and before // every < after // every
