"""The MoE grouped matmul against a dense matmul of the same useful FLOPs, XLA's `jax.lax.ragged_dot` and
PyTorch's grouped GEMM (`torch._grouped_mm`, where this torch has it for the device), forward only, at
Qwen3-30B-A3B's expert shape (hidden 2048, width 768, 128 experts, top 8).

    python benchmarks/grouped_matmul.py                   # GPU: bf16, 4k-32k tokens; CPU: fp32, 256 and 1,024
    python benchmarks/grouped_matmul.py --tokens 8192

Rows are T * 8 assignments routed at random (sorted by expert). Each implementation is checked against the
blocked one before it is timed. The table gives TFLOP/s of useful work (2 * rows * D * F) and the share of
the dense GEMM's rate (the issue's target on GPU: >= 70%), plus XLA's compiled-FLOPs / useful-FLOPs ratio
(cost analysis with the block loop unrolled). That ratio is a static bound: it counts every block the
layout could need, while blocks holding no rows are skipped at run time.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import markdown_table, record, time_fn
from kernels.grouped_matmul import grouped_matmul, grouped_matmul_impl

D, F, E, K = 2048, 768, 128, 8


def torch_grouped(x, w, sizes):
    """A callable running torch._grouped_mm on the same data, or None where this torch cannot."""
    try:
        import torch

        dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
        tx = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(dev, getattr(torch, x.dtype.name))
        tw = torch.from_numpy(np.asarray(w.astype(jnp.float32))).to(dev, getattr(torch, w.dtype.name))
        offs = torch.from_numpy(np.cumsum(np.asarray(sizes)).astype(np.int32)).to(dev)
        torch._grouped_mm(tx, tw, offs=offs)
    except Exception:  # noqa: BLE001 - no grouped GEMM in this torch / on this device
        return None

    def run():
        out = torch._grouped_mm(tx, tw, offs=offs)
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def flops_ratio(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = jax.default_backend() == "gpu"
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768] if gpu else [256, 1024])
    p.add_argument("--iters", type=int, default=10 if gpu else 3)
    args = p.parse_args(argv)
    dtype = jnp.bfloat16 if gpu else jnp.float32
    rows = []
    for T in args.tokens:
        M = T * K
        rng = np.random.default_rng(0)
        experts = np.sort(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).reshape(-1))
        sizes = jnp.asarray(np.bincount(experts, minlength=E), jnp.int32)
        x = jnp.asarray(rng.standard_normal((M, D)), dtype)
        w = jnp.asarray(rng.standard_normal((E, D, F)) / np.sqrt(D), dtype)
        wd = w[0]
        useful = 2 * M * D * F
        ref = jax.jit(lambda x, w: grouped_matmul(x, w, sizes, impl="blocked"))(x, w)
        cands = {"dense matmul (same FLOPs)": (jax.jit(lambda x, w: x @ w), (x, wd), None)}
        for impl in ("auto", "blocked", "ragged"):
            f = jax.jit(lambda x, w, impl=impl: grouped_matmul(x, w, sizes, impl=impl))
            name = f"qwen-jax {impl}" + (f" ({grouped_matmul_impl(impl, x, w)})" if impl == "auto" else "")
            unrolled = lambda x, w, impl=impl: grouped_matmul(x, w, sizes, impl=impl, unroll=True)  # noqa: E731
            cands[name if impl != "ragged" else "jax.lax.ragged_dot"] = (f, (x, w), unrolled)
        theirs = torch_grouped(x, w, sizes)
        dense_s = None
        for name, (f, a, unrolled) in cands.items():
            if unrolled is not None:
                err = float(jnp.abs(f(*a).astype(jnp.float32) - ref.astype(jnp.float32)).max())
                if not err <= 2e-2 * float(jnp.abs(ref.astype(jnp.float32)).max()):
                    sys.exit(f"{name} differs from the blocked result by {err:.3g} at T={T}")
            s = time_fn(f, *a, iters=args.iters)
            dense_s = dense_s or s
            ratio = f"{flops_ratio(unrolled, *a) / useful:.2f}x" if unrolled is not None else "1.00x"
            rows.append([T, name, s * 1e3, useful / s / 1e12, f"{dense_s / s:.0%}", ratio])
        if theirs is not None:
            import time

            theirs()
            t = time.perf_counter()
            for _ in range(args.iters):
                theirs()
            s = (time.perf_counter() - t) / args.iters
            rows.append([T, "torch._grouped_mm", s * 1e3, useful / s / 1e12, f"{dense_s / s:.0%}", "n/a"])
    table = markdown_table(["tokens", "implementation", "ms", "useful TFLOP/s", "of dense",
                            "compiled FLOPs bound / useful"], rows)
    record("MoE grouped matmul (benchmarks/grouped_matmul.py)", table,
           notes=f"{jnp.dtype(dtype).name}; rows = tokens x {K}, D={D}, F={F}, {E} experts, random routing; forward; "
                 "the FLOPs bound is XLA's cost analysis, which counts every static block (blocks holding no "
                 "rows are skipped at run time)")


if __name__ == "__main__":
    main()
