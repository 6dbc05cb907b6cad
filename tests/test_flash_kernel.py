"""The Pallas Mosaic GPU flash-attention kernels, on the CPU: GPU interpret mode (uninitialised memory
reads as NaN, so unwritten outputs show; race detection on) against the jnp reference, and the full
lowering to Mosaic GPU for CUDA.

Each interpreted kernel call runs on its own here: XLA:CPU deadlocks the interpreter when a forward and a
backward kernel share one jitted computation (seen with jax 0.10.2), so gradients are taken eagerly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from conftest import mosaic_gpu_results
from kernels import _compat
from kernels.flash_attention import attention_reference, flash_attention_forward
from kernels.flash_backward import flash_attention_backward

pytestmark = pytest.mark.timeout(300)  # a barrier bug hangs the interpreter


@pytest.fixture(autouse=True)
def _interpreter_state():
    yield
    _compat.reset_interpret_state()


def _inputs(rng, B, T, S, N, K, D, dtype=jnp.bfloat16, n_segments=1):
    key = jax.random.key(int(rng.integers(1 << 31)))
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (B, T, N, D), dtype)
    k = jax.random.normal(ks[1], (B, S, K, D), dtype)
    v = jax.random.normal(ks[2], (B, S, K, D), dtype)
    do = jax.random.normal(ks[3], (B, T, N, D), dtype)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), n_segments - 1, replace=False)) if n_segments > 1 else []
        for c in cuts:
            seg[b, c:] += 1
    return q, k, v, do, jnp.asarray(seg)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


# jax 0.10's interpreter is slow and runs the kernels' fallback formulation (transposed operands read from
# memory), so there it takes two cases; .ci/kernels-jax011 runs all of them as they run on hardware.
JAX011 = pytest.mark.skipif(_compat.JAX_VERSION < (0, 11), reason="run under jax 0.11 by .ci/kernels-jax011")
CASES = [  # B, T, N, K, causal, segments, window
    pytest.param(1, 128, 2, 2, True, 1, None, marks=JAX011),
    pytest.param(1, 100, 4, 2, True, 3, None, marks=JAX011),  # padding (T not a block multiple), GQA 2, packing
    (1, 72, 4, 1, False, 2, None),   # GQA 4 (MQA), non-causal
    (1, 128, 2, 1, True, 1, 40),     # sliding window
]


@pytest.mark.parametrize("B,T,N,K,causal,segments,window", CASES)
def test_forward_and_gradients_match_reference(rng, B, T, N, K, causal, segments, window):
    D = 64
    q, k, v, do, seg = _inputs(rng, B, T, T, N, K, D, n_segments=segments)
    kw = dict(causal=causal, sliding_window=window, scale=D ** -0.5, interpret=True)
    out, lse = flash_attention_forward(q, k, v, seg, seg, **kw)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_fn = lambda q, k, v: attention_reference(q, k, v, causal=causal, segment_ids=seg,  # noqa: E731
                                                 sliding_window=window)
    ref, vjp = jax.vjp(ref_fn, f32(q), f32(k), f32(v))
    assert not np.isnan(np.asarray(out, np.float32)).any() and _rel(out, ref) <= 2e-2
    assert _rel(jnp.exp(lse), jnp.exp(_reference_lse(q, k, seg, causal, window, D ** -0.5))) <= 1e-2
    grads = flash_attention_backward(q, k, v, seg, seg, out, lse, do, **kw)
    for ours, theirs, name in zip(grads, vjp(f32(do)), "qkv"):
        assert not np.isnan(np.asarray(ours, np.float32)).any(), name
        assert _rel(ours, theirs) <= 2e-2, name
    assert not _compat.races_found()


@pytest.mark.parametrize("T,S,docs,window,unmasked,N,overlap", [
    # packed rows: skipped tiles, unmasked middles, ring wrapped (jax 0.10's interpreter took 43 s)
    pytest.param(400, 400, [250, 150], None, True, 1, False, marks=JAX011),
    pytest.param(400, 400, [250, 150], None, True, 2, False, marks=JAX011),  # the same with GQA 2
    pytest.param(384, 384, [384], 160, False, 2, False, marks=JAX011),  # a window: earlier tiles never loaded
    pytest.param(70, 300, None, None, True, 2, False, marks=JAX011),  # prefill after a cache: end-aligned
    pytest.param(400, 400, [250, 150], None, True, 2, True, marks=JAX011),  # forward: QK(j+1) beside PV(j)
    pytest.param(384, 384, [384], 160, False, 1, True, marks=JAX011),
    # packed prefill (infer's runner): prompts back to back, a padding segment last, the window a bound on
    # the longest prompt
    pytest.param(800, 800, [270, 200, 250, 80], 512, False, 2, False, marks=JAX011),
])
def test_tile_skipping_and_unmasked_runs_match_reference(rng, T, S, docs, window, unmasked, N, overlap):
    """Cases whose tile runs (checked below) skip tiles (above the causal diagonal; below a window or a
    document start), stream more tiles than the ring holds, and (where `unmasked`: in every kernel) run
    tiles without a mask, forward and backward; `overlap`: the forward's intra-warpgroup pipelining."""
    from kernels.flash_attention import _PAD_KV_SEG, _PAD_Q_SEG, FlashConfig
    from kernels.tile_ranges import program_ranges, visibility

    D, K = 64, 1
    q, k, v, do, _ = _inputs(rng, 1, T, S, N, K, D)
    kv_seg = jnp.asarray(np.repeat(np.arange(len(docs)), docs)[None] if docs else np.zeros((1, S)), jnp.int32)
    q_seg = kv_seg[:, S - T:]
    cfg = FlashConfig()
    for bq, bk, st, pairs in ((cfg.block_q, cfg.block_kv, cfg.stages, False),
                              (cfg.bwd_block_q, cfg.bwd_block_kv, cfg.bwd_stages, True)):
        qs = np.full((1, -(-T // (2 * bq)) * 2 * bq), _PAD_Q_SEG, np.int32)
        ks = np.full((1, -(-S // (2 * bk)) * 2 * bk), _PAD_KV_SEG, np.int32)
        qs[:, :T], ks[:, :S] = q_seg, kv_seg
        vis, full = visibility(qs, ks, T=T, S=S, block_q=bq, block_kv=bk, causal=True, window=window)
        table = np.asarray(program_ranges(vis, full)).reshape(-1, 10)
        runs_ = table[:, 2:].reshape(-1, 4)
        assert (table[:, 1] - table[:, 0]).max() > st  # some stream wraps the ring
        assert (runs_[:, 2] > runs_[:, 1]).any() or not unmasked  # unmasked middles
        assert not np.asarray(vis)[0, -1, 0] == (S == T)  # the last block skips the first tile
    kw = dict(causal=True, sliding_window=window, scale=D ** -0.5, interpret=True)
    out, lse = flash_attention_forward(q, k, v, q_seg, kv_seg, config=FlashConfig(overlap=overlap), **kw)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_fn = lambda q, k, v: attention_reference(q, k, v, causal=True, segment_ids=(q_seg, kv_seg),  # noqa: E731
                                                 sliding_window=window)
    ref, vjp = jax.vjp(ref_fn, f32(q), f32(k), f32(v))
    assert not np.isnan(np.asarray(out, np.float32)).any() and _rel(out, ref) <= 2e-2
    grads = flash_attention_backward(q, k, v, q_seg, kv_seg, out, lse, do, **kw)
    for ours, theirs, name in zip(grads, vjp(f32(do)), "qkv"):
        assert not np.isnan(np.asarray(ours, np.float32)).any(), name
        assert _rel(ours, theirs) <= 2e-2, name
    assert not _compat.races_found()


def _reference_lse(q, k, seg, causal, window, scale):
    from kernels.flash_attention import attention_mask

    B, T, N, D = q.shape
    K = k.shape[2]
    s = jnp.einsum("BTKGD,BSKD->BKGTS", q.reshape(B, T, K, N // K, D).astype(jnp.float32),
                   k.astype(jnp.float32)) * scale
    mask = attention_mask(T, k.shape[1], causal=causal, q_segment_ids=seg, kv_segment_ids=seg,
                          sliding_window=window)[:, None, None]
    lse = jax.nn.logsumexp(jnp.where(mask, s, -jnp.inf), axis=-1)  # [B, K, G, T]
    return lse.reshape(B, N, T)


def test_dispatch_pallas_is_differentiable(rng):
    q, k, v, do, seg = _inputs(rng, 1, 64, 64, 2, 1, 64, n_segments=2)
    f = lambda impl: lambda q, k, v: jnp.sum(  # noqa: E731
        kernels.attention(q, k, v, segment_ids=seg, impl=impl, interpret=True).astype(jnp.float32)
        * do.astype(jnp.float32))
    ours = jax.grad(f("pallas"), argnums=(0, 1, 2))(q, k, v)  # eager: one interpreted kernel at a time
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    theirs = jax.grad(f("xla"), argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
    for a, b in zip(ours, theirs):
        assert _rel(a, b) <= 2e-2


@pytest.mark.parametrize("D,dtype,causal,overlap", [(64, jnp.bfloat16, True, False),
                                                    (128, jnp.float16, False, True),
                                                    (128, jnp.bfloat16, True, False),
                                                    (128, jnp.bfloat16, True, True)])
def test_kernels_lower_for_cuda(D, dtype, causal, overlap):
    """The hardware forms (P in registers, in-place accumulation, QK(j+1) beside PV(j) with a partial
    wgmma wait, register split) lower to Mosaic GPU; the interpreter runs their SMEM formulation."""
    from kernels.flash_attention import FlashConfig

    B, T, N, K = 2, 512, 8, 2
    sd = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    kw = dict(causal=causal, sliding_window=None, scale=D ** -0.5)

    def fwd(q, k, v, s):
        return flash_attention_forward(q, k, v, s, s, config=FlashConfig(overlap=overlap), **kw)

    def bwd(q, k, v, s, o, lse, do):
        return flash_attention_backward(q, k, v, s, s, o, lse, do, **kw)

    seg = sd(B, T, dt=jnp.int32)
    for f, args in ((fwd, (sd(B, T, N, D), sd(B, T, K, D), sd(B, T, K, D), seg)),
                    (bwd, (sd(B, T, N, D), sd(B, T, K, D), sd(B, T, K, D), seg, sd(B, T, N, D),
                           sd(B, N, T, dt=jnp.float32), sd(B, T, N, D)))):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        calls = mosaic_gpu_results(text)
        q, kv, lse = f"{B}x{T}x{N}x{D}x{_ty(dtype)}", f"{B}x{T}x{K}x{D}x{_ty(dtype)}", f"{B}x{N}x{T}xf32"
        if f is fwd:  # one kernel: O and the log-sum-exp
            assert calls == [[q, lse]], calls
        else:  # two kernels: dK/dV, then dQ
            assert calls == [[kv, kv], [q]], calls
        scores = [ln for ln in text.splitlines() if "dot_general" in ln and f"{T}x{T}" in ln.rsplit("->", 1)[1]]
        assert not scores, scores  # no [T, T] attention scores outside the kernels


def _ty(dtype) -> str:
    return {jnp.bfloat16: "bf16", jnp.float16: "f16"}[dtype]




def test_dispatch_names():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.attention(q, q, q, impl="triton")
    with pytest.raises(ValueError, match="bf16/fp16 with head_dim 64 or 128"):
        kernels.attention(q, q, q, impl="pallas", interpret=True)
    assert kernels.attention_impl("auto", q, q) == "xla"  # CPU


def test_model_parity_with_pallas_attention(tmp_path):
    """The whole model with attn_impl="pallas" (interpret mode) against transformers, in bf16."""
    import torch

    import qwen_jax
    from reference.hf_models import build

    model, path = build(tmp_path, seed=3, dtype=torch.bfloat16, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=64)
    cfg, params = qwen_jax.load_pretrained(path, progress=False)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 40)).astype(np.int32)
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.float().numpy()
    with _compat.interpret_mode():
        ours = np.asarray(qwen_jax.forward(cfg, params, jnp.asarray(ids), attn_impl="pallas").logits)
    xla = np.asarray(qwen_jax.forward(cfg, params, jnp.asarray(ids), attn_impl="xla").logits)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() / scale <= 4e-2  # the bf16 tolerance of tests/test_parity.py
    assert np.abs(ours - xla).max() / scale <= 4e-2
