"""Shared by the benchmark scripts: device description, timing, and appending results to docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import shlex
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
