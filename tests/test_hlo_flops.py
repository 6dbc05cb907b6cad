"""qwen_jax.hlo_flops: matmul FLOPs of a compiled program with its loops multiplied out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax import moe
from qwen_jax.hlo_flops import matmul_flops


def _counted(fn, *args):
    return matmul_flops(jax.jit(fn).lower(*args).compile().as_text())


def test_loops_are_multiplied_out_and_a_conditional_costs_its_larger_branch():
    x, w = jnp.ones((64, 32)), jnp.ones((8, 32, 32))
    one = 2 * 64 * 32 * 32
    programs = {
        "scan": lambda x, w: jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0],
        "unrolled scan": lambda x, w: jax.lax.scan(lambda h, wi: (h @ wi, None), x, w, unroll=True)[0],
        "fori_loop": lambda x, w: jax.lax.fori_loop(0, 8, lambda i, h: h @ w[i], x),
        "nested": lambda x, w: jax.lax.fori_loop(0, 2, lambda i, h: jax.lax.scan(
            lambda g, wi: (g @ wi, None), h, w[:4])[0], x),
    }
    for name, fn in programs.items():
        counted = _counted(fn, x, w)
        assert counted.flops == 8 * one, (name, counted.flops / one)
        assert counted.unknown_loops == 0 and not counted.opaque_calls, name
    branchy = _counted(lambda x, w: jax.lax.cond(x[0, 0] > 0, lambda: x @ w[0] @ w[1] @ w[2], lambda: x @ w[0]), x, w)
    assert branchy.flops == 3 * one
    # XLA's own analysis counts the scan's body once: the reason this module exists
    xla = jax.jit(programs["scan"]).lower(x, w).compile().cost_analysis()
    assert (xla[0] if isinstance(xla, list) else xla)["flops"] < 2 * one


def test_a_training_step_counts_exactly_its_model_flops():
    """A scanned 3-layer model's whole optimizer step: forward, backward (hand-written SwiGLU and chunked
    cross-entropy backward passes included) equal 6 x the matmul parameters per token plus attention, which at
    T=64 (one query block) computes every score rather than the causal half flops_per_token counts."""
    from train.config import TrainConfig
    from train.metrics import flops_per_token
    from train.optim import make_optimizer
    from train.placement import put_batch
    from train.trainer import init_state, make_train_step, state_shardings

    cfg = qwen_jax.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                               num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    bs, seq = 2, 64
    rules = qwen_jax.ShardingRules(qwen_jax.make_mesh(""))
    tc = TrainConfig(steps=100, seq_len=seq, batch_size=bs, warmup_steps=10, compute_dtype="float32", remat="none")
    opt = make_optimizer(tc)
    state = init_state(qwen_jax.init_params(cfg, jax.random.key(0), jnp.float32, rules), opt, 0)
    step = make_train_step(cfg, tc, opt, rules, state_shardings(state))
    batch = put_batch({"tokens": np.zeros((1, bs, seq + 1), np.int32),
                       "segment_ids": np.ones((1, bs, seq + 1), np.int32)}, rules, (None, "act_batch", None))
    counted = matmul_flops(step.lower(state, batch).compile().as_text())
    other_causal_half = 6 * cfg.num_layers * 2 * seq * cfg.num_heads * cfg.head_dim / 2
    assert counted.flops == (flops_per_token(cfg, seq) + other_causal_half) * bs * seq
    assert counted.unknown_loops == 0 and not counted.opaque_calls


def test_the_grouped_matmul_block_loop_is_counted_as_if_unrolled():
    T, D, F, E, k = 512, 64, 32, 8, 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (T, D))
    weights, experts = moe.route(jax.random.normal(keys[1], (T, E)), k, True, jnp.float32)
    wg, wu = (jax.random.normal(kk, (E, D, F)) for kk in keys[2:4])
    wd = jax.random.normal(keys[4], (E, F, D))

    def grads(unroll):
        def loss(*a):
            return jnp.sum(moe.grouped_expert_mlp(a[0], weights, experts, *a[1:], impl="blocked", unroll=unroll) ** 2)
        return lambda *a: jax.grad(loss, argnums=(0, 1, 2, 3))(*a)

    looped, unrolled = _counted(grads(False), x, wg, wu, wd), _counted(grads(True), x, wg, wu, wd)
    assert looped.flops == unrolled.flops >= 3 * 3 * 2 * T * k * D * F  # forward, dx, dw of 3 projections
    xla = jax.jit(grads(True)).lower(x, wg, wu, wd).compile().cost_analysis()
    assert looped.flops == pytest.approx((xla[0] if isinstance(xla, list) else xla)["flops"], rel=0.05)


def test_gpu_gemm_custom_calls_count_and_kernels_are_named():
    """cuBLAS GEMMs (GPU's optimized HLO) are counted from their dimension numbers; a Pallas kernel is named
    as opaque, a TopK is not; a loop without a known trip count is reported."""
    hlo = """HloModule m

%body (p: (s32[], f32[16,32])) -> (s32[], f32[16,32]) {
  %p = (s32[], f32[16,32]{1,0}) parameter(0)
  %a = f32[16,32]{1,0} get-tuple-element(%p), index=1
  %w = f32[32,32]{1,0} constant({...})
  %g = (f32[16,32]{1,0}, s8[1024]{0}) custom-call(%a, %w), custom_call_target="__cublas$gemm", backend_config={"operation_queue_id":"0","gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"beta":0}}, metadata={op_name="jit(f)/dot_general"}
  ROOT %t = (s32[], f32[16,32]{1,0}) tuple(%i, %a)
}

%cond (p: (s32[], f32[16,32])) -> pred[] {
  %p = (s32[], f32[16,32]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[16,32]) -> f32[16,32] {
  %x = f32[16,32]{1,0} parameter(0)
  %k = (f32[16,2]{1,0}, s32[16,2]{1,0}) custom-call(%x), custom_call_target="TopK"
  %m = f32[16,32]{1,0} custom-call(%x), custom_call_target="mosaic_gpu_v2"
  %t = (s32[], f32[16,32]{1,0}) tuple(%z, %x)
  %l = (s32[], f32[16,32]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %u = (s32[], f32[16,32]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %r = f32[16,32]{1,0} get-tuple-element(%l), index=1
}
"""
    counted = matmul_flops(hlo)
    assert counted.flops == (5 + 1) * 2 * 16 * 32 * 32
    assert counted.opaque_calls == {"mosaic_gpu_v2"} and counted.unknown_loops == 1
