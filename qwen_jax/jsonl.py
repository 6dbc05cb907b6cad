"""Line-numbered JSONL reading shared by the data loaders and the CLIs: errors name file and line."""

from __future__ import annotations

from typing import Callable, Iterator

from qwen_jax.errors import DataError


def iter_jsonl(path: str, opener: Callable = open,
               on_bad: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line. A line that is not a JSON object is a DataError, or,
    with `on_bad`, is passed to on_bad(line number, reason) and skipped."""
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
                reason = f"not valid JSON ({e.msg})"
            else:
                if isinstance(obj, dict):
                    yield n, obj
                    continue
                reason = f"expected a JSON object, got {type(obj).__name__}"
            if on_bad is None:
                raise DataError(f"{path}:{n}: {reason}")
            on_bad(n, reason)
