"""Where a jitted training step spends its time: one step under `jax.profiler`, every executed HLO op's
time added up by what it belongs to (attention, MLP / MoE, LM head + cross-entropy, optimiser, other).

Each op is placed by the `op_name` metadata JAX writes into the compiled HLO: the Flax module path
(`layers_N/attn/...`, `.../mlp/...`, `.../moe/...`), whether it is inside the model (`Qwen3`), inside the
differentiated loss but outside the model (the LM head and cross-entropy), or outside differentiation
(gradient clipping, AdamW). Loop ops (while, call, conditional) are skipped: their bodies are counted.
Ops that run concurrently are each counted in full, so the shares are of summed op time, not of wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax

CATEGORIES = ("attention", "MLP / MoE", "other model ops", "LM head + cross-entropy", "optimiser + rest")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")
_CONTAINERS = ("while", "call", "conditional")


def category(op_name: str) -> str:
    if "/attn/" in op_name:
        return "attention"
    if "/mlp/" in op_name or "/moe/" in op_name:
        return "MLP / MoE"
    if "Qwen3" in op_name:
        return "other model ops"
    if "jvp(" in op_name or "transpose(" in op_name:
        return "LM head + cross-entropy"
    return "optimiser + rest"


def op_categories(hlo_text: str) -> dict[str, str]:
    """Instruction name -> category, from compiled HLO text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out[m.group(1)] = category(m.group(2))
    return out


def step_split(run_once, hlo_text: str) -> dict[str, float]:
    """Seconds of op time per category for one call of `run_once()` (which must block until done).
    `hlo_text`: the compiled step's `as_text()`. Returns {} when the profiler records no HLO ops."""
    names = op_categories(hlo_text)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        try:
            run_once()
        finally:
            jax.profiler.stop_trace()
        traces = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        if not traces:
            return {}
        with gzip.open(traces[0]) as f:
            events = json.load(f)["traceEvents"]
    totals = collections.Counter()
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") != "X" or not op or op.startswith(_CONTAINERS):
            continue
        totals[names.get(op, "optimiser + rest")] += e["dur"] * 1e-6
    return {c: totals[c] for c in CATEGORIES if c in totals}


def split_cells(split: dict[str, float]) -> list[str]:
    """Percent of summed op time per category, in CATEGORIES order ("n/a" without a profile)."""
    total = sum(split.values())
    return [f"{split.get(c, 0.0) / total:.0%}" if total else "n/a" for c in CATEGORIES]
