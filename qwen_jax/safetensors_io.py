"""Lazy, memory-mapped reading of .safetensors files into numpy (bf16 via ml_dtypes).

The `safetensors` package's numpy reader rejects bfloat16, and its torch reader would make torch a
runtime dependency, so reading parses the (simple, documented) format directly: an 8-byte
little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then raw data.
Tensors are views into a read-only memory map: nothing is read until a tensor is used, so a loader
touches each byte once. Writing uses `safetensors.numpy.save_file`, which accepts ml_dtypes arrays.
Only safetensors is ever read: never pickle.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from qwen_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Header index of one file, validated up front (truncation, offsets, dtypes)."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{path}: truncated or corrupt safetensors header "
                                          f"(header claims {n} bytes, file has {size})")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_len = size - self._data_start
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except KeyError as e:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported or missing header field {e}") from None
            if end - start != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(f"{path}: tensor {name!r} has data_offsets inconsistent with its shape")
            if end > data_len:
                raise CheckpointError(f"{path}: truncated file: tensor {name!r} needs bytes up to "
                                      f"{self._data_start + end}, file has {size}")
            self.entries[name] = (dtype, shape, start, end)

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """Read-only array view of one tensor (lazy: pages are read when touched). Each call maps the
        file anew and the mapping lives only as long as the view: pages a loader has copied out stop
        counting towards the process's resident memory as soon as it drops the view (a mapping kept for
        the whole load would hold every touched page, the size of the checkpoint, until the end)."""
        dtype, shape, start, end = self.entries[name]
        if end == start:
            return np.zeros(shape, dtype)
        buf = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start + start, shape=(end - start,))
        return buf.view(dtype).reshape(shape)


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file as _save

    _save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)
