"""User-facing error families. Each message names the file, key or parameter at fault.

CLIs catch `QwenJaxError` and print `error: <message>` on one line with exit code 2.
"""


class QwenJaxError(Exception):
    """Base class for errors caused by user input rather than bugs."""


class ConfigError(QwenJaxError, ValueError):
    """A malformed or unsupported model configuration."""


class CheckpointError(QwenJaxError):
    """A missing, truncated, malformed or mismatched checkpoint file or tensor."""


class RequestError(QwenJaxError, ValueError):
    """An invalid inference request or sampling parameter."""


class DataError(QwenJaxError, ValueError):
    """A malformed or empty dataset."""


def require(cond: bool, msg: str, error: type[QwenJaxError] = ConfigError) -> None:
    """Raise `error(msg)` unless `cond`: the one validator behind every flag and parameter check."""
    if not cond:
        raise error(msg)
