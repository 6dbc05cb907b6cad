"""Matmul FLOPs of a compiled XLA program, loops included.

XLA's cost analysis (`compiled.cost_analysis()`) counts a while loop's body once, so a layer stack under
`scan` (or a grouped matmul's block loop) reports one iteration's work. `matmul_flops` walks the optimized
HLO text instead (`compiled.as_text()`): every dot, inside fusions and called computations, times the trip
count XLA proved for each enclosing loop (`known_trip_count`), the costliest branch of a conditional, and
cuBLAS GEMM custom calls (GPU), whose dimension numbers are in their backend config.

    counted = matmul_flops(jax.jit(f).lower(*args).compile().as_text())
    counted.flops, counted.unknown_loops, counted.opaque_calls

What it cannot see is reported, not guessed: loops without a known trip count are counted once
(`unknown_loops`), and custom calls that may hold matmuls (Pallas kernels, cuDNN attention) count zero and
are named (`opaque_calls`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"[a-z]\w*\[([\d,]*)\]")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CUBLAS = ("__cublas$gemm", "__cublas$lt$matmul")
# Custom calls that may hide matmuls (Pallas / Mosaic / Triton kernels, cuDNN attention): reported as opaque.
# Others (TopK, sharding markers, sorts) do no matmul work.
_KERNEL = re.compile(r"mosaic|triton|pallas|cudnn|fmha|gemm|matmul|attention", re.IGNORECASE)


@dataclasses.dataclass
class MatmulFlops:
    flops: float  # 2 * M * N * K summed over every dot execution
    unknown_loops: int  # while loops without a known trip count (their body counted once)
    opaque_calls: set[str]  # custom-call targets whose work is not counted


def _split_shape(rest: str) -> tuple[str, str]:
    """'f32[4,8]{1,0} dot(...), attrs' or '(s32[], f32[2]) while(...)' -> (shape text, the remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _dims(shape: str) -> list[int]:
    """The first array shape in `shape` -> its dimensions."""
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _operands(tail: str) -> list[str]:
    """'dot(%a, f32[2]{0} %b), lhs_...' -> the operand texts."""
    start = tail.index("(") + 1
    depth, out, cur = 1, [], ""
    for ch in tail[start:]:
        depth += {"(": 1, ")": -1, "[": 1, "]": -1, "{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            break
        if ch == "," and depth == 1:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


def _lhs_dims(tail: str, shapes: dict[str, str]) -> list[int]:
    """The first operand's dimensions: printed inline ('f32[4,8]{1,0} %a') or its defining instruction's."""
    lhs = _operands(tail)[0]
    return _dims(lhs if "[" in lhs.split("%")[0] else shapes.get(lhs.lstrip("%"), ""))


def _attr_list(tail: str, name: str) -> list[int]:
    m = re.search(name + r"=\{([\d,]*)\}", tail)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _dot_flops(result_shape: str, lhs_dims: list[int], contracting: list[int]) -> float:
    return 2.0 * math.prod(_dims(result_shape)) * math.prod(lhs_dims[d] for d in contracting)


def _backend_config(tail: str) -> dict:
    """The instruction's backend_config JSON object ({} if none or unreadable): its braces are balanced, so
    it is read up to the brace that closes it, whatever attributes follow."""
    start = tail.find("backend_config={")
    if start < 0:
        return {}
    start += len("backend_config=")
    depth = 0
    for end, ch in enumerate(tail[start:], start):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            try:
                return json.loads(tail[start:end + 1])
            except json.JSONDecodeError:
                return {}
    return {}


def matmul_flops(hlo_text: str) -> MatmulFlops:
    """Dot / GEMM FLOPs of an optimized HLO module's entry computation, loops multiplied out."""
    computations: dict[str, list[tuple[str, str, str]]] = {}  # name -> [(instruction, shape, tail)]
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = computations.setdefault(m.group(2), [])
            if m.group(1):
                entry = m.group(2)
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            shape, tail = _split_shape(m.group(2))
            current.append((m.group(1), shape, tail))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    result = MatmulFlops(0.0, 0, set())
    memo: dict[str, float] = {}

    def called(tail: str, key: str) -> list[str]:
        m = re.search(r"\b" + key + r"=(\{[^}]*\}|%?[\w.\-]+)", tail)
        return [c.strip().lstrip("%") for c in m.group(1).strip("{}").split(",")] if m else []

    def cost(name: str) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # guards against a cycle
        shapes = {n: s for n, s, _ in computations.get(name, [])}
        total = 0.0
        for _, shape, tail in computations.get(name, []):
            op = tail.split("(", 1)[0].strip()
            if op == "dot":
                total += _dot_flops(shape, _lhs_dims(tail, shapes), _attr_list(tail, "lhs_contracting_dims"))
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', tail)
                target = target.group(1) if target else "?"
                numbers = _backend_config(tail).get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
                if target in _CUBLAS and numbers.get("lhs_contracting_dimensions"):
                    contracting = [int(d) for d in numbers["lhs_contracting_dimensions"]]
                    total += _dot_flops(shape, _lhs_dims(tail, shapes), contracting)
                elif _KERNEL.search(target):
                    result.opaque_calls.add(target)
            elif op == "while":
                trip = _TRIP.search(tail)
                if trip is None:
                    result.unknown_loops += 1
                n = int(trip.group(1)) if trip else 1
                total += n * sum(cost(c) for c in called(tail, "body") + called(tail, "condition"))
            elif op == "conditional":
                branches = called(tail, "branch_computations") or (
                    called(tail, "true_computation") + called(tail, "false_computation"))
                total += max((cost(c) for c in branches), default=0.0)
            else:
                for key in ("calls", "to_apply"):
                    total += sum(cost(c) for c in called(tail, key))
        memo[name] = total
        return total

    result.flops = cost(entry)
    return result
