"""Flash attention forward / backward TFLOP/s: the Pallas kernel beside cuDNN and XLA, in one run.

    python benchmarks/attention.py                       # batch 8, 16 heads, head_dim 128, seq 1k..16k
    python benchmarks/attention.py --seqs 1024 4096 --impls pallas cudnn

Needs an NVIDIA GPU (Pallas on Hopper or newer). Each kernel is first checked against the XLA reference
on a small case, then timed. FLOPs: 4 * B * H * T * S * D forward (halved when causal), 2.5x that for the
backward (dQ, dK, dV: five matmuls against two). Results are appended to docs/benchmarks.md.
(Paged decode GB/s is not benchmarked yet: the paged Pallas kernel is not written.)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernels  # noqa: E402
from benchmarks.common import markdown_table, record, time_fn  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--impls", nargs="+", default=["pallas", "cudnn", "xla"])
    args = p.parse_args(argv)
    if jax.devices()[0].platform != "gpu":
        print("benchmarks/attention.py needs an NVIDIA GPU (the kernels are tested on the CPU by the test suite)",
              file=sys.stderr)
        return 2
    B, H, D = args.batch, args.heads, args.head_dim
    K = args.kv_heads or H
    rows = []
    for causal in (True, False):
        for T in args.seqs:
            ks = jax.random.split(jax.random.key(T), 4)
            q = jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16)
            k = jax.random.normal(ks[1], (B, T, K, D), jnp.bfloat16)
            v = jax.random.normal(ks[2], (B, T, K, D), jnp.bfloat16)
            do = jax.random.normal(ks[3], (B, T, H, D), jnp.bfloat16)
            flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
            for impl in args.impls:
                fwd = jax.jit(lambda q, k, v, impl=impl: kernels.attention(q, k, v, causal=causal, impl=impl))
                grad = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.vdot(
                    kernels.attention(q, k, v, causal=causal, impl=impl).astype(jnp.float32),
                    do.astype(jnp.float32)), argnums=(0, 1, 2)))
                try:
                    if T == args.seqs[0]:
                        ref = kernels.attention(q, k, v, causal=causal, impl="xla").astype(jnp.float32)
                        err = float(jnp.abs(fwd(q, k, v).astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
                        if err > 2e-2:
                            raise AssertionError(f"forward differs from the reference by {err:.3g}")
                    t_f = time_fn(fwd, q, k, v)
                    t_fb = time_fn(grad, q, k, v)
                    rows.append([impl, "causal" if causal else "full", T, flops / t_f / 1e12,
                                 2.5 * flops / max(t_fb - t_f, 1e-9) / 1e12, t_f * 1e3, (t_fb - t_f) * 1e3])
                except Exception as e:  # an impl that cannot run this case is reported, not fatal
                    rows.append([impl, "causal" if causal else "full", T, "n/a", "n/a", type(e).__name__,
                                 str(e).splitlines()[0][:60] if str(e) else ""])
                print(rows[-1], flush=True)
    table = markdown_table(["impl", "mask", "seq", "fwd TFLOP/s", "bwd TFLOP/s", "fwd ms", "bwd ms"], rows)
    record("Flash attention", table, f"batch {B}, heads {H}/{K}, head_dim {D}, bf16; bwd time = grad - fwd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
