"""Line-numbered JSONL reading shared by the data loaders and the CLIs: errors name file and line."""

from __future__ import annotations

from typing import Callable, Iterator

from qwen_jax.errors import DataError


def iter_jsonl(path: str, opener: Callable = open) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; DataError for a line that is not a JSON object."""
    import json

    try:
        f = opener(path, "rt", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj
