"""Command-line plumbing shared by every CLI (infer.generate, infer.serve, train.*): the one place where a
user error (`QwenJaxError`) becomes one line on stderr and exit code 2, and where Ctrl-C / SIGTERM become
a per-command message and exit code 130 / 143 instead of a traceback."""

from __future__ import annotations

import signal
import sys
from typing import Callable

from qwen_jax.errors import QwenJaxError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same cleanup runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_cli(fn: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a CLI body. A QwenJaxError prints `error: <message>` and returns 2; a non-finite loss
    (FloatingPointError) returns 1; Ctrl-C prints `interrupted` and returns 130 (SIGTERM: 143)."""
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return fn() or 0
    except QwenJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(interrupted, file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def say(msg: str) -> None:
    """A status line on stderr, from process 0 only."""
    import jax

    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
