"""Shared by the benchmark scripts: device description, timing, and appending results to docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import signal
import sys
import time

import jax

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")


def device_description() -> str:
    d = jax.devices()[0]
    return f"{jax.device_count()} x {d.device_kind} ({d.platform}), jax {jax.__version__}"


def time_fn(fn, *args, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call of fn(*args) after `warmup` calls (results blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _tie(args) -> int:
    """The argument device_loop ties to the previous outputs: the smallest floating-point array."""
    import jax.numpy as jnp

    arrays = [i for i, a in enumerate(args) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]
    if not arrays:
        raise ValueError("time_device needs a floating-point array argument to tie the iterations together")
    return min(arrays, key=lambda i: args[i].size)


def device_loop(fn, args, n: int):
    """A jitted function of `args` that calls fn(*args) n times in a loop and returns the last outputs.
    So that no call is hoisted out of the loop (XLA moves loop-invariant work out, and drops optimization
    barriers before it does), each iteration's smallest floating-point argument (`_tie`) gets
    0 * (an element of the previous outputs) added."""
    import jax.numpy as jnp
    from jax import lax

    tie = _tie(args)
    shapes = jax.eval_shape(fn, *args)

    @jax.jit
    def run(*args):
        def body(_, outs):
            zero = jax.tree.leaves(outs)[0].reshape(-1)[0].astype(jnp.float32) * 0.0
            a = list(args)
            a[tie] = a[tie] + zero.astype(a[tie].dtype)
            return fn(*a)

        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return lax.fori_loop(0, n, body, init)

    return run


def time_device(fn, *args, iters: int = 20, reps: int = 5) -> float:
    """Device seconds per call of fn(*args), dispatch excluded: fn runs 1 and 1 + iters times inside one
    jitted loop (`device_loop`); the per-call time is the difference of the two loops' median wall times
    over `iters`, less the same for a loop of the tie alone (one elementwise pass over an argument). A
    call too short for that difference to show above the timer's noise is timed again over 4x the
    iterations, up to 64x."""

    def per_call(f, n) -> float:
        return (time_fn(device_loop(f, args, 1 + n), *args, iters=reps)
                - time_fn(device_loop(f, args, 1), *args, iters=reps)) / n

    tie = _tie(args)
    for n in (iters, 4 * iters, 16 * iters, 64 * iters):
        t = per_call(fn, n) - per_call(lambda *a: a[tie], n)
        if t > 0:
            return t
    raise RuntimeError(f"a call is too short to time on the device ({64 * iters} iterations showed no time)")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(x):
        return f"{x:,.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def record(title: str, table: str, notes: str = "") -> None:
    """Print the table and append it, with date, device and command, to docs/benchmarks.md."""
    print(table)
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    new = not os.path.exists(DOC)
    with open(DOC, "a") as f:
        if new:
            f.write("# Benchmarks\n\nAppended by the scripts in `benchmarks/`; newest last.\n")
        f.write(f"\n## {title}: {datetime.date.today().isoformat()}\n\n")
        f.write(f"- device: {device_description()}\n")
        f.write(f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`\n")
        if notes:
            f.write(f"- notes: {notes}\n")
        f.write("\n" + table + "\n")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def recorded(title: str, headers: list[str], notes: str = ""):
    """Collect table rows (yielded list) and record them on exit, also when the run is interrupted
    (Ctrl-C, or SIGTERM from `timeout`): the rows measured so far are kept, marked as interrupted."""
    rows: list[list] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    complete = False
    try:
        yield rows
        complete = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if rows:
            record(title, markdown_table(headers, rows),
                   notes if complete else f"{notes}; interrupted: only the rows measured before")
