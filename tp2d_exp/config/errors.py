"""The one exception every validation stage raises, and what kind of failure it records in summary.json."""

from tp2d_exp.records import FailureKind


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key and the fix."""

    failure = FailureKind.config


class ResourceError(ConfigError):
    """The cluster cannot serve the job as configured (too few GPUs or CPUs, a busy cluster)."""

    failure = FailureKind.resources


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line, for the one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
