"""The one reader behind every file input (prompts files, training text, SFT chats, DPO pairs) and the atomic
JSON writer.

Every failure to read is a `DataError` with one line naming the file and, where it applies, the line and
the byte offset: a missing path, a directory, no permission, bytes that are not UTF-8, a corrupt or truncated
compressed file (.gz, .xz, .bz2), a corrupt parquet file. `check_text` refuses training text that is not
text (control bytes or replacement characters)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import re
import zlib
from typing import Callable, Iterator

from qwen_jax.errors import DataError

COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
# Errors a damaged compressed stream raises while it is read.
_STREAM_ERRORS = (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile, OSError)
# Characters that do not occur in text: C0/C1 controls other than tab, newlines and form feed, and U+FFFD
# (what a decoder leaves for bytes it could not read).
_NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")


def kind(path: str) -> tuple[str, str | None]:
    """-> (extension, compression): "a.jsonl.gz" -> (".jsonl", ".gz"); "a.txt" -> (".txt", None)."""
    base, ext = os.path.splitext(path)
    if ext.lower() in COMPRESSED:
        return os.path.splitext(base)[1].lower(), ext.lower()
    return ext.lower(), None


def open_binary(path: str):
    """The file opened for reading bytes (decompressing by extension); DataError for a missing path, a
    directory, no permission or another OS error."""
    opener = COMPRESSED.get(kind(path)[1] or "", open)
    try:
        if os.path.isdir(path):
            raise IsADirectoryError
        return opener(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _stream_error(path: str, e: Exception) -> DataError:
    comp = kind(path)[1]
    what = f"a corrupt or truncated {comp} file" if comp else "cannot be read"
    return DataError(f"{path}: {what} ({type(e).__name__}: {str(e).strip()[:100] or 'unexpected end'})")


def _decode(path: str, raw: bytes, offset: int = 0, line: int | None = None) -> str:
    """`raw` (the file's bytes from `offset` on, starting at `line`; None: at line 1) as strict UTF-8; a
    DataError naming the line and byte offset of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        n = line if line is not None else raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{n}: not UTF-8 text (byte {offset + e.start} of the file is "
                        f"0x{raw[e.start]:02x})") from None


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for every line, decoded as strict UTF-8 (a leading BOM is dropped)."""
    f = open_binary(path)
    with f:
        offset, n = 0, 0
        try:
            for n, raw in enumerate(f, 1):
                text = _decode(path, raw, offset, n)
                if n == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                offset += len(raw)
                yield n, text
        except _STREAM_ERRORS as e:
            raise _stream_error(path, e) from None


def read_text(path: str) -> str:
    """The whole file as text (strict UTF-8, universal newlines)."""
    f = open_binary(path)
    with f:
        try:
            raw = f.read()
        except _STREAM_ERRORS as e:
            raise _stream_error(path, e) from None
    text = _decode(path, raw)
    text = text[1:] if text.startswith("\ufeff") else text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def iter_jsonl(path: str, on_bad: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line. A line that is not a JSON object is a DataError, or,
    with `on_bad`, is passed to on_bad(line number, reason) and skipped. Unreadable bytes are always a
    DataError naming the line and byte offset."""
    for n, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            reason = f"not valid JSON ({e.msg})"
        except RecursionError:
            reason = "not valid JSON (nested too deeply)"
        else:
            if isinstance(obj, dict):
                yield n, obj
                continue
            reason = f"expected a JSON object, got {type(obj).__name__}"
        if on_bad is None:
            raise DataError(f"{path}:{n}: {reason}")
        on_bad(n, reason)


def read_parquet_column(path: str, column: str) -> list:
    """The values of one column of a parquet file; DataError for a missing column or a corrupt file."""
    import pyarrow
    import pyarrow.parquet as pq

    f = open_binary(path)  # the path checks, and decompression of a .parquet.gz
    with f:
        try:
            table = pq.read_table(io.BytesIO(f.read()))
        except (pyarrow.ArrowException, *_STREAM_ERRORS) as e:
            raise DataError(f"{path}: not a readable parquet file ({str(e).strip().splitlines()[0][:120]})") from None
    if column not in table.column_names:
        raise DataError(f"{path}: no column {column!r} (columns: {table.column_names})")
    return table.column(column).to_pylist()


def check_text(text: str, where: str, max_share: float = 0.01) -> None:
    """DataError when more than `max_share` of `text`'s characters are control bytes or replacement
    characters: binary data, or text in another encoding, that should not be trained on."""
    if not text:
        return
    bad = len(_NOT_TEXT.findall(text))
    if bad > max_share * len(text):
        raise DataError(f"{where}: does not look like text ({bad:,} of {len(text):,} characters are control bytes "
                        f"or U+FFFD); refusing to train on it")


def write_json(path: str, obj) -> None:
    """Write `obj` as indented JSON atomically (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
