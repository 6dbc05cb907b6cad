"""File reading and writing shared by the data loaders, the CLIs and the checkpoint code: line-numbered JSONL
reading (errors name file and line) and atomic JSON writing (a reader never sees half a file)."""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

from qwen_jax.errors import DataError


def iter_jsonl(path: str, opener: Callable = open,
               on_bad: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line. A line that is not a JSON object is a DataError, or,
    with `on_bad`, is passed to on_bad(line number, reason) and skipped. A file that is not UTF-8 is a
    DataError naming the line."""
    try:
        f = opener(path, "rt", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a JSONL file") from None
    with f:
        n = 0
        try:
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
        except UnicodeDecodeError:
            raise DataError(f"{path}:{n + 1}: not UTF-8 text") from None


def write_json(path: str, obj) -> None:
    """Write `obj` as indented JSON atomically (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
