"""Command-line plumbing shared by every CLI (infer.generate, infer.serve, train.*): the one place where a
user error (`QwenJaxError`) becomes one line on stderr and exit code 2, where Ctrl-C / SIGTERM become a
one-line message and exit code 130 / 143 instead of a traceback, and the argument parser whose usage
errors are one line too.

A signal's KeyboardInterrupt can be lost: Python drops exceptions raised inside garbage-collection
callbacks (jax registers one, and a signal that arrives while C++ code runs is often handled there), and
some libraries catch everything. So the handler records the signal (and inside a GC callback only records
it), and long-running loops and start-up stages call `check_interrupt()`: an interruption is never
swallowed, at worst it is noticed one step late."""

from __future__ import annotations

import argparse
import contextlib
import gc
import signal
import sys
from typing import Callable

from qwen_jax.errors import QwenJaxError

_pending: list[int] = []  # signals received during run_cli


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same cleanup runs."""


def _interruption(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _in_gc_callback(frame, depth: int = 8) -> bool:
    """Whether `frame` runs inside a garbage-collection callback, where a raised exception is dropped."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None and depth > 0:
        if frame.f_code in codes:
            return True
        frame, depth = frame.f_back, depth - 1
    return False


def _on_signal(signum, frame):
    _pending.append(signum)
    if not _in_gc_callback(frame):  # there it would be dropped; check_interrupt() raises it soon after
        raise _interruption(signum)


def _unraisable(hook):
    """sys.unraisablehook that stays silent about an interruption dropped where exceptions cannot propagate
    (it is pending, and check_interrupt() raises it)."""

    def quiet(unraisable):
        if not (_pending and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            hook(unraisable)

    return quiet


def check_interrupt() -> None:
    """Raise the interruption of a signal received earlier (deferred, or whose exception was swallowed on
    the way), once."""
    if _pending:
        signum = signal.SIGTERM if signal.SIGTERM in _pending else _pending[-1]
        del _pending[:]
        raise _interruption(signum)


@contextlib.contextmanager
def deferred_interrupts():
    """Inside, SIGINT and SIGTERM are recorded, not raised: `check_interrupt()` raises them at a safe point
    (the training loop calls it between steps, so a step is never cut between donating its input state and
    returning the new one). A second signal while one is pending raises at once: the escape hatch for a step
    that hangs. Main thread only; elsewhere a no-op."""
    previous = {}

    def record(signum, frame):
        _pending.append(signum)
        if len(_pending) > 1:
            del _pending[:]
            raise _interruption(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, record)
        except ValueError:
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`error: ...; see --help`, exit 2) instead of the full usage."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(fn: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a CLI body. A QwenJaxError prints `error: <message>` and returns 2; a non-finite loss
    (FloatingPointError) returns 1; Ctrl-C prints the interruption's message (the exception's own, set by
    whoever knows what was saved, else `interrupted`) and returns 130 (SIGTERM: 143)."""
    previous = {}
    del _pending[:]
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread: leave signals alone
            pass
    hook = sys.unraisablehook
    if previous:
        sys.unraisablehook = _unraisable(hook)
    try:
        return fn() or 0
    except QwenJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(e.args[0] if e.args and isinstance(e.args[0], str) else interrupted, file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook
        del _pending[:]


def say(msg: str) -> None:
    """A status line on stderr, from process 0 only."""
    import jax

    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
