"""Attention entry points used by the model, the engine and the trainer.

Each entry point dispatches on `impl`:
  * "xla": pure jnp (runs everywhere, differentiable): `blockwise_attention`, the reference's result by
    blocks of query rows that skip keys a causal mask hides (paged attention gathers the pages first);
  * "pallas": the Pallas Mosaic GPU kernel (Hopper and newer; `interpret=True` runs it in GPU interpret
    mode on any machine). Flash attention has a Pallas forward and backward (jax.custom_vjp);
  * "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (attention: no segment ids or window;
    paged attention: one query token, after gathering the pages);
  * "auto": Pallas on Hopper+ GPUs for bf16/fp16 with head_dim 64 or 128 once the kernel has passed a
    one-time self-check on the device (`_self_check`), else cuDNN on other NVIDIA GPUs when it applies
    (attention only), else XLA (always on the CPU). Paged attention takes the Pallas
    kernel only for short queries (Tq * Hq / Hkv <= PAGED_AUTO_MAX_ROWS rows per kv head): each block of
    64 rows reads the whole context once, so long prefill chunks go to XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels._compat import interpret_mode
from kernels.blockwise_attention import blockwise_attention
from kernels.flash_attention import attention_reference, flash_attention_forward
from kernels.flash_backward import flash_attention_backward
from kernels.paged_attention import (PagedConfig, gather_pages, paged_attention_forward,
                                     paged_attention_reference, pallas_supported, write_pages)

IMPLS = ("auto", "pallas", "cudnn", "xla")
PAGED_AUTO_MAX_ROWS = 256
# A self-check that has not finished after this long (a kernel that hangs on this device) counts as failed:
# impl="auto" falls back instead of hanging the caller. Compiling the kernels takes well under a minute.
SELF_CHECK_TIMEOUT_S = 180.0


def _hopper_or_newer() -> bool:
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return False
    try:
        return float(getattr(dev, "compute_capability", "0")) >= 9.0
    except ValueError:
        return False


@functools.cache
def _self_check(kind: str, dtype_name: str, head_dim: int, interpret: bool = False) -> bool:
    """Whether the Pallas `kind` kernel ("flash", "paged", or "grouped": the grouped matmul) compiles, runs
    and matches its reference on a small case on this machine. Run once per process before impl="auto"
    picks the kernel (in a thread of its own, so it runs eagerly even while the caller is being traced): a
    kernel that cannot compile here, or does not finish within SELF_CHECK_TIMEOUT_S, falls back with a
    warning instead of failing or hanging the caller's whole program. (The check's thread is a daemon: a
    kernel that hangs keeps it, not the process.)"""
    import threading
    import warnings

    result: list[str | None] = []
    thread = threading.Thread(target=lambda: result.append(  # JAX's trace state is per thread
        _run_self_check(kind, jnp.dtype(dtype_name), head_dim, interpret)), name=f"{kind}-self-check", daemon=True)
    thread.start()
    thread.join(SELF_CHECK_TIMEOUT_S)
    if thread.is_alive():
        error = f"it did not finish within {SELF_CHECK_TIMEOUT_S:g} s"
    else:
        error = result[0] if result else "its thread died"
    if error:
        warnings.warn(f"the Pallas {kind} kernel ({dtype_name}, head_dim {head_dim}) failed its self-check on "
                      f"{jax.devices()[0].device_kind}: {error}; impl='auto' will not use it",
                      RuntimeWarning, stacklevel=2)
    return not error


def _run_self_check(kind: str, dtype, head_dim: int, interpret: bool) -> str | None:
    """The self-check's work: None when the kernel matches its reference, else what went wrong. The cases
    are long enough to wrap each kernel's K/V ring (flash: up to 3 tiles of 128 keys through the forward's
    2-deep ring, 6 tiles of 64 through the backward's; paged: one split over 600 keys in 38 scattered
    pages, 10 steps of 64 through a 4-deep ring, beside a 37-key row), so a pipeline bug that a single pass
    hides fails here."""
    ks = jax.random.split(jax.random.key(0), 4)
    try:
        if kind == "flash":
            q = jax.random.normal(ks[0], (1, 384, 2, head_dim), dtype)
            k = jax.random.normal(ks[1], (1, 384, 1, head_dim), dtype)
            v = jax.random.normal(ks[2], (1, 384, 1, head_dim), dtype)
            outs = {}
            for impl in ("pallas", "xla"):
                def loss(q, k, v, impl=impl):
                    return jnp.sum(attention(q, k, v, impl=impl, interpret=interpret).astype(jnp.float32) ** 2)

                outs[impl] = (attention(q, k, v, impl=impl, interpret=interpret),
                              *jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
            pairs = list(zip(outs["pallas"], outs["xla"]))
        elif kind == "grouped":
            from kernels.grouped_matmul import grouped_matmul

            x = jax.random.normal(ks[0], (100, 64), dtype)
            w = (jax.random.normal(ks[1], (3, 64, 128), jnp.float32) / 8).astype(dtype)
            sizes = jnp.asarray([70, 0, 30], jnp.int32)
            outs = {}
            for impl in ("pallas", "blocked"):
                def f(x, w, impl=impl):
                    return grouped_matmul(x, w, sizes, impl=impl, interpret=interpret)

                y, vjp = jax.vjp(f, x, w)
                outs[impl] = (y, *vjp(jnp.ones_like(y)))
            pairs = list(zip(outs["pallas"], outs["blocked"]))
        else:
            q = jax.random.normal(ks[0], (2, 1, 4, head_dim), dtype)
            pages = [jax.random.normal(kk, (80, 16, 2, head_dim), dtype) for kk in ks[1:3]]
            tables = jax.random.permutation(ks[3], 80)[:76].reshape(2, 38).astype(jnp.int32)
            lengths = jnp.asarray([600, 37], jnp.int32)
            pairs = [(paged_attention(q, *pages, tables, lengths, impl="pallas", interpret=interpret, num_splits=1),
                      paged_attention(q, *pages, tables, lengths, impl="xla"))]
        for ours, theirs in pairs:
            ours, theirs = jnp.asarray(ours, jnp.float32), jnp.asarray(theirs, jnp.float32)
            err = float(jnp.abs(ours - theirs).max() / jnp.abs(theirs).max())
            if not err <= 2e-2:
                return f"differs from the reference by {err:.3g}"
    except Exception as e:  # noqa: BLE001 - any failure means: do not pick this kernel automatically
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return f"{type(e).__name__}: {msg}"
    return None


def _pallas_supported(q) -> bool:
    return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] in (64, 128)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")


def _resolve(impl: str, q=None, *, kv_len=None, segment_ids=None, sliding_window=None,
             interpret: bool = False) -> str:
    _check_impl(impl)
    if impl != "auto":
        return impl
    if q is not None and _pallas_supported(q) and (
            interpret or (_hopper_or_newer() and _self_check("flash", q.dtype.name, q.shape[-1]))):
        return "pallas"
    if (q is not None and jax.devices()[0].platform == "gpu" and segment_ids is None and sliding_window is None
            and kv_len == q.shape[1]):  # cuDNN's causal mask is top-left aligned: only T == S agrees
        return "cudnn"
    return "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_seg, kv_seg, causal, window, scale, interpret):
    return flash_attention_forward(q, k, v, q_seg, kv_seg, causal=causal, sliding_window=window, scale=scale,
                                   interpret=interpret)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, causal, window, scale, interpret):
    out, lse = flash_attention_forward(q, k, v, q_seg, kv_seg, causal=causal, sliding_window=window, scale=scale,
                                       interpret=interpret)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(causal, window, scale, interpret, res, d_out):
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = flash_attention_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, causal=causal,
                                          sliding_window=window, scale=scale, interpret=interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention_impl(impl: str, q, k, *, segment_ids=None, sliding_window=None, interpret: bool = False) -> str:
    """The implementation `attention(q, k, ..., impl=impl)` runs ("pallas", "cudnn" or "xla")."""
    return _resolve(impl, q, kv_len=k.shape[1], segment_ids=segment_ids, sliding_window=sliding_window,
                    interpret=interpret)


def _pallas_attention(q, k, v, causal, segment_ids, sliding_window, scale, interpret):
    if not _pallas_supported(q):
        raise ValueError(f"the Pallas attention kernel takes bf16/fp16 with head_dim 64 or 128, got "
                         f"{q.dtype} with head_dim {q.shape[-1]}")
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    if q_seg is None:
        q_seg, kv_seg = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    return _flash(q, k, v, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32), causal, sliding_window, scale,
                  interpret)


def attention(q, k, v, *, causal: bool = True, segment_ids=None, sliding_window: int | None = None,
              scale: float | None = None, impl: str = "auto", interpret: bool = False):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D]. Differentiable.

    segment_ids: [B, T] (when T == S) or a (q [B, T], kv [B, S]) pair; tokens attend only within
    equal ids. Softmax scale defaults to D ** -0.5."""
    impl = _resolve(impl, q, kv_len=k.shape[1], segment_ids=segment_ids, sliding_window=sliding_window,
                    interpret=interpret)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "pallas":
        return _pallas_attention(q, k, v, causal, segment_ids, sliding_window, scale, interpret)
    if impl == "cudnn":
        if segment_ids is not None or sliding_window is not None:
            raise ValueError("impl='cudnn' supports neither segment_ids nor sliding_window; use 'pallas' or 'xla'")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
    return blockwise_attention(q, k, v, causal=causal, segment_ids=segment_ids, sliding_window=sliding_window,
                               scale=scale)


def _resolve_paged(impl: str, q, k_pages, interpret: bool) -> str:
    _check_impl(impl)
    if impl != "auto":
        return impl
    rows = q.shape[1] * q.shape[2] // k_pages.shape[-2]
    if pallas_supported(q, k_pages) is None and rows <= PAGED_AUTO_MAX_ROWS and (
            interpret or (_hopper_or_newer() and _self_check("paged", q.dtype.name, q.shape[-1]))):
        return "pallas"
    return "xla"


def paged_attention_impl(impl: str, q, k_pages, *, interpret: bool = False) -> str:
    """The implementation `paged_attention(q, k_pages, ..., impl=impl)` runs."""
    return _resolve_paged(impl, q, k_pages, interpret)


def _cudnn_paged(q, k_pages, v_pages, block_tables, lengths, scale, layer):
    T = q.shape[1]
    if T != 1:
        raise ValueError(f"impl='cudnn' paged attention takes one query token per sequence, got {T}; "
                         "use 'pallas' or 'xla'")
    k = gather_pages(k_pages, block_tables, layer)  # [B, S, Hkv, D]
    v = gather_pages(v_pages, block_tables, layer)
    lens = jnp.minimum(lengths, k.shape[1]).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lens, implementation="cudnn")


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, scale: float | None = None,
                    layer=None, impl: str = "auto", interpret: bool = False, num_splits: int | None = None):
    """q [B, Tq, Hq, D]; pages [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
    lengths [B] int32 -> [B, Tq, Hq, D]. The queries are the last Tq positions of each sequence.

    With `layer` (a scalar, possibly traced), pages are the whole pool [L, num_blocks, block_size,
    Hkv, D] and that layer is read: the model passes the pool this way so no layer slice is copied.
    num_splits: split-K programs per sequence for the Pallas kernel (None: enough to fill the GPU)."""
    impl = _resolve_paged(impl, q, k_pages, interpret)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "pallas":
        return paged_attention_forward(q, k_pages, v_pages, block_tables, lengths, scale=scale, layer=layer,
                                       config=PagedConfig(num_splits=num_splits), interpret=interpret)
    if impl == "cudnn":
        return _cudnn_paged(q, k_pages, v_pages, block_tables, lengths, scale, layer)
    k, v = gather_pages(k_pages, block_tables, layer), gather_pages(v_pages, block_tables, layer)
    return blockwise_attention(q, k, v, causal=True, scale=scale, kv_lengths=lengths)  # long prefill skips keys


__all__ = ["attention", "paged_attention", "attention_impl", "paged_attention_impl", "write_pages",
           "attention_reference", "blockwise_attention", "paged_attention_reference", "interpret_mode"]
