"""The one exception every validation stage raises."""


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key and the fix."""


class ResourceError(ConfigError):
    """The cluster cannot serve the job as configured (too few GPUs or CPUs, a busy cluster)."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line, for the one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
