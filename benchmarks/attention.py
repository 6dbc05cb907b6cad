"""Attention kernels on a GPU: the Pallas kernels beside cuDNN and XLA, in one run.

    python benchmarks/attention.py                       # both parts, default shapes
    python benchmarks/attention.py --parts flash --seqs 1024 4096 --impls pallas cudnn
    python benchmarks/attention.py --parts paged --batches 1 64 --contexts 2048 32768

flash: forward / backward TFLOP/s at batch 8, 16 heads, head_dim 128, seq 1k..16k, causal and not.
FLOPs: 4 * B * H * T * S * D forward (halved when causal), 2.5x that for the backward (dQ, dK, dV: five
matmuls against two).
paged: decode (one query token) over a paged KV pool with shuffled block tables, Qwen3-8B heads (32 query,
8 kv, head_dim 128), pages of 16 and 64 tokens, batch 1..256, context 512..32k; achieved GB/s = bytes of K
and V read / time, beside the device's copy bandwidth measured in the same run (bytes read + written by a
large on-device copy / time). xla is the gather-then-attend path; cudnn gathers then runs cuDNN.

Times are device times: each call runs 1 and 1 + --iters times inside one jitted loop (inputs tied to the
previous outputs, so nothing is hoisted or dropped) and the difference is divided by --iters, so launch
and dispatch overheads are excluded (benchmarks/common.time_device).

Needs an NVIDIA GPU (Pallas on Hopper or newer). Each kernel is first checked against the XLA reference,
then timed. Results are appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernels  # noqa: E402
from benchmarks.common import recorded, time_device  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--impls", nargs="+", default=["pallas", "cudnn", "xla"])
    p.add_argument("--parts", nargs="+", choices=["flash", "paged"], default=["flash", "paged"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 256], help="paged decode batches")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 32768], help="paged contexts")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64], help="paged: tokens per page")
    p.add_argument("--max-kv-gb", type=float, default=16.0, help="skip paged cases whose K+V exceed this")
    p.add_argument("--iters", type=int, default=20, help="calls per timed loop (device time, dispatch excluded)")
    args = p.parse_args(argv)
    if jax.devices()[0].platform != "gpu":
        print("benchmarks/attention.py needs an NVIDIA GPU (the kernels are tested on the CPU by the test suite)",
              file=sys.stderr)
        return 2
    if "flash" in args.parts:
        flash(args)
    if "paged" in args.parts:
        paged(args)
    return 0


def check(ours, theirs, what: str, tol: float = 2e-2) -> None:
    ours, theirs = ours.astype(jnp.float32), theirs.astype(jnp.float32)
    err = float(jnp.abs(ours - theirs).max() / jnp.abs(theirs).max())
    if not err <= tol:  # NaN fails too
        raise AssertionError(f"{what} differs from the reference by {err:.3g}")


def flash(args) -> None:
    B, H, D = args.batch, args.heads, args.head_dim
    K = args.kv_heads or H
    with recorded("Flash attention", ["impl", "mask", "seq", "fwd TFLOP/s", "bwd TFLOP/s", "fwd ms", "bwd ms"],
                  f"batch {B}, heads {H}/{K}, head_dim {D}, bf16; device time (dispatch excluded); "
                  "bwd time = grad - fwd") as rows:
        for causal in (True, False):
            for T in args.seqs:
                flash_case(args, rows, B, T, H, K, D, causal)


def flash_case(args, rows, B, T, H, K, D, causal) -> None:
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
            if T == args.seqs[0]:  # on hardware: forward and all three gradients vs the reference
                check(fwd(q, k, v), kernels.attention(q, k, v, causal=causal, impl="xla"), "forward")
                ref_grads = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(
                    kernels.attention(q, k, v, causal=causal, impl="xla").astype(jnp.float32),
                    do.astype(jnp.float32)), argnums=(0, 1, 2)))(q, k, v)
                for name, ours, theirs in zip(("dq", "dk", "dv"), grad(q, k, v), ref_grads):
                    check(ours, theirs, name)
            t_f = time_device(fwd, q, k, v, iters=args.iters)
            t_fb = time_device(grad, q, k, v, iters=args.iters)
            rows.append([impl, "causal" if causal else "full", T, flops / t_f / 1e12,
                         2.5 * flops / max(t_fb - t_f, 1e-9) / 1e12, t_f * 1e3, (t_fb - t_f) * 1e3])
        except Exception as e:  # an impl that cannot run this case is reported, not fatal
            rows.append([impl, "causal" if causal else "full", T, "n/a", "n/a", type(e).__name__,
                         str(e).splitlines()[0][:60] if str(e) else ""])
        print(rows[-1], flush=True)


def copy_bandwidth(gb: float = 4.0) -> float:
    """Device copy bandwidth in bytes/s: (read + write) bytes of a large on-device copy / time."""
    x = jnp.zeros((int(gb * 2**30) // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    return 2 * x.nbytes / time_device(f, x)


def paged(args) -> None:
    N, K, D = 32, 8, 128
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s", flush=True)
    with recorded("Paged decode attention", ["impl", "block size", "batch", "context", "GB/s", "% of copy bw", "us"],
                  f"heads {N}/{K}, head_dim {D}, bf16, shuffled block tables; device time (dispatch excluded); "
                  f"copy bandwidth {bw / 1e9:,.0f} GB/s (read + write)") as rows:
        for BS in args.block_sizes:
            for ctx in args.contexts:
                for B in args.batches:
                    kv_bytes = 2 * B * ctx * K * D * 2
                    if kv_bytes <= args.max_kv_gb * 2**30:
                        rows += paged_case(args, B, ctx, BS, N, K, D, kv_bytes, bw)


def paged_case(args, B, ctx, BS, N, K, D, kv_bytes, bw) -> list[list]:
    per_seq = -(-ctx // BS)
    NB = B * per_seq + 1
    ks = jax.random.split(jax.random.key(B * 100003 + ctx + BS), 4)
    q = jax.random.normal(ks[0], (B, 1, N, D), jnp.bfloat16)
    k_pages = jax.random.normal(ks[1], (NB, BS, K, D), jnp.bfloat16)
    v_pages = jax.random.normal(ks[2], (NB, BS, K, D), jnp.bfloat16)
    tables = jax.random.permutation(ks[3], NB)[: B * per_seq].reshape(B, per_seq).astype(jnp.int32)
    lengths = jnp.full((B,), ctx, jnp.int32)
    ref, rows = None, []
    for impl in args.impls:
        f = jax.jit(lambda q, kp, vp, bt, ln, impl=impl: kernels.paged_attention(q, kp, vp, bt, ln, impl=impl))
        try:
            if ref is None:
                ref = kernels.paged_attention(q, k_pages, v_pages, tables, lengths, impl="xla")
            check(f(q, k_pages, v_pages, tables, lengths), ref, "output")
            t = time_device(f, q, k_pages, v_pages, tables, lengths, iters=args.iters)
            rows.append([impl, BS, B, ctx, kv_bytes / t / 1e9, 100 * kv_bytes / t / bw, t * 1e6])
        except Exception as e:  # an impl that cannot run this case is reported, not fatal
            rows.append([impl, BS, B, ctx, "n/a", "n/a", f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
                         if str(e) else type(e).__name__])
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
