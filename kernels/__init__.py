"""Attention entry points used by the model, the engine and the trainer.

Each entry point dispatches on `impl`:
  * "xla": the pure-jnp reference beside each kernel (runs everywhere, differentiable);
  * "auto": the fastest available implementation for the current backend.
The Pallas Mosaic GPU kernels ("pallas") and the cuDNN path ("cudnn") are added by the kernels work;
until then "auto" resolves to "xla".
"""

from __future__ import annotations

from kernels.flash_attention import attention_reference
from kernels.paged_attention import paged_attention_reference, write_pages

IMPLS = ("auto", "xla")


def _resolve(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    return "xla"


def attention(q, k, v, *, causal: bool = True, segment_ids=None, sliding_window: int | None = None,
              scale: float | None = None, impl: str = "auto", interpret: bool = False):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D]. Differentiable.

    segment_ids: [B, T] (when T == S) or a (q [B, T], kv [B, S]) pair; tokens attend only within
    equal ids. Softmax scale defaults to D ** -0.5."""
    del interpret  # only meaningful for the Pallas kernels
    _resolve(impl)
    return attention_reference(q, k, v, causal=causal, segment_ids=segment_ids,
                               sliding_window=sliding_window, scale=scale)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, scale: float | None = None,
                    layer=None, impl: str = "auto", interpret: bool = False):
    """q [B, Tq, Hq, D]; pages [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
    lengths [B] int32 -> [B, Tq, Hq, D]. The queries are the last Tq positions of each sequence.

    With `layer` (a scalar, possibly traced), pages are the whole pool [L, num_blocks, block_size,
    Hkv, D] and that layer is read: the model passes the pool this way so no layer slice is copied."""
    del interpret
    _resolve(impl)
    return paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, scale=scale, layer=layer)


__all__ = ["attention", "paged_attention", "write_pages", "attention_reference", "paged_attention_reference"]
