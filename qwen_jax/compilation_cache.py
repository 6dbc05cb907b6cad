"""JAX's persistent compilation cache, on by default: a process that runs the same programs as an earlier
one (the same model, the same engine shapes) loads them from disk instead of compiling them again, which
cuts a fresh server's or trainer's start-up and first-request latency.

The directory is, in order: what the caller passes; JAX's own setting (JAX_COMPILATION_CACHE_DIR, or
jax.config) if one is already made; $QWEN_JAX_CACHE_DIR; ~/.cache/qwen-jax/xla. Pass False to leave JAX's
configuration untouched.
"""

from __future__ import annotations

import os
import sys

import jax


def default_dir() -> str:
    return os.environ.get("QWEN_JAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qwen-jax", "xla")


def enable(path: str | bool | None = True) -> str | None:
    """Turn the persistent compilation cache on; -> the directory in use (None: off)."""
    current = jax.config.jax_compilation_cache_dir
    if path is False or path is None:
        return current
    if current and path is True:
        return current  # the user's own setting wins
    directory = os.path.abspath(os.path.expanduser(path if isinstance(path, str) else default_dir()))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        print(f"warning: no compilation cache ({directory}: {e.strerror})", file=sys.stderr)
        return current
    jax.config.update("jax_compilation_cache_dir", directory)
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default: most engine steps are faster
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


class Compilations:
    """Counts the programs XLA builds (a compilation, or a load from the persistent cache) while open, by
    the jitted function's name: `with Compilations() as c: ...; c.count("_decode_impl")`. JAX's own dispatch
    cache keys also differ by argument placement (a NumPy array against a device array of the same shape),
    so its size overstates what was compiled; this counts the builds."""

    def __init__(self):
        self.names: list[str] = []

    def _listen(self, event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.names.append(str(kw.get("fun_name", "")))

    def count(self, *names: str) -> int:
        """Builds of the functions whose names contain any of `names` (all builds without names)."""
        return sum(1 for n in self.names if not names or any(x in n for x in names))

    def __enter__(self) -> "Compilations":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
