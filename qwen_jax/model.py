"""Qwen3 / Qwen3-MoE as pure-functional Flax (linen) modules over a plain params pytree.

Params layout (weights stored [in, out]; layers stacked on a leading axis per run of same-kind layers):
  embed                [V, D]
  layers_<g>/          one scanned group per run of dense or MoE layers (config.layer_groups)
    input_norm/scale   [L, D]        post_attn_norm/scale [L, D]
    attn/q [L, D, Hq, Hd]  k, v [L, D, Hkv, Hd]  o [L, Hq, Hd, D]  q_norm, k_norm [L, Hd]
    attn/q_bias [L, Hq, Hd] ... only with attention_bias
    mlp/gate, up [L, D, F]  down [L, F, D]                                  (dense layers)
    moe/router [L, D, E]  gate, up [L, E, D, Fe]  down [L, E, Fe, D]        (MoE layers)
  final_norm/scale     [D]
  lm_head              [D, V]        only when embeddings are untied (causal LMs)
  score                [D, L]        sequence classifiers (reward models) instead of lm_head

One forward serves training (full sequences, optional segment ids) and inference (a paged KV cache
plus attention metadata; the updated cache is returned, never mutated in place).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import kernels
from qwen_jax import moe, rope
from qwen_jax.config import Qwen3Config
from qwen_jax.lora import LoraConfig, lora_a_init
from qwen_jax.sharding import ShardingRules, constrain
from qwen_jax.swiglu import swiglu

_INIT = nn.initializers.normal(stddev=0.02)  # HF initializer_range


class AttentionMeta(NamedTuple):
    """Metadata for the cache path. The T new tokens of sequence b are its last T positions."""

    slot_mapping: jax.Array  # [B, T] int32: flat cache slot (block * block_size + offset); -1 = padding
    block_tables: jax.Array  # [B, max_blocks] int32: page ids of each sequence
    lengths: jax.Array  # [B] int32: tokens in the sequence after this step (new ones included)


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32 (None with return_hidden=True)
    hidden: jax.Array  # [B, T, D] final normed hidden states
    cache: dict[str, jax.Array] | None  # updated KV pool (None without a cache)
    router_logits: jax.Array | None  # [L_moe, B*T, E] for the load-balancing loss (None if dense)
    routes: jax.Array | None  # [L_moe, B, T, k] int32: the experts each token went to (None if dense)
    hidden_states: tuple[jax.Array, ...] | None  # per-layer outputs if requested, HF order


def _param(module: nn.Module, name: str, shape, names, init=_INIT):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, module.param_dtype)


def _plus_lora(module: nn.Module, name: str, y, x, w_shape, in_dims: int, names):
    """y (= x @ W) plus the LoRA term scale * (x @ A) @ B when `name` is adapted. W is [*in, *out] with
    `in_dims` input dims contracted against x's last dims; A [*in, r], B [r, *out]."""
    lc = module.lora
    if lc is None or name not in lc.targets:
        return y
    a = _param(module, f"{name}_lora_a", (*w_shape[:in_dims], lc.rank), (*names[:in_dims], None), lora_a_init)
    b = _param(module, f"{name}_lora_b", (lc.rank, *w_shape[in_dims:]), (None, *names[in_dims:]),
               nn.initializers.zeros)
    xa = jnp.tensordot(x, a.astype(x.dtype), axes=in_dims)
    return y + lc.scale * jnp.tensordot(xa, b.astype(x.dtype), axes=1)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def _per_shard(rules: ShardingRules | None, impl: str, fn, args, kinds):
    """fn(*args), run once per shard (shard_map) when it runs a Pallas kernel on a multi-device mesh: XLA's
    partitioner cannot split a Pallas call and would gather its operands onto every device.

    kinds name each arg's layout: "q" [B, T, Hq, D], "kv" [B, S, Hkv, D], "pool" [..., blocks, block_size,
    Hkv, D], "seq" [B, ...], "batch" [B], "scalar"; None args pass through. Shards split the batch over
    the batch axes and the heads over the head axes; heads stay whole when query and kv heads cannot be
    split alike (every group's kv head must sit on its query heads' device)."""
    if impl != "pallas" or rules is None or rules.mesh.size == 1:
        return fn(*args)
    q = args[0]
    batch = rules.spec(("act_batch",), q.shape[:1])[0]
    heads = rules.spec(("act_heads",), q.shape[2:3])[0]
    kv_heads = next(x.shape[-2] for x, kind in zip(args, kinds) if kind in ("kv", "pool"))
    if heads != rules.spec(("act_kv_heads",), (kv_heads,))[0]:
        heads = None
    layouts = {"q": P(batch, None, heads, None), "kv": P(batch, None, heads, None), "seq": P(batch, None),
               "batch": P(batch), "scalar": P()}
    specs = []
    for x, kind in zip(args, kinds):
        if kind == "pool":
            specs.append(P(*([None] * (x.ndim - 2)), heads, None))
        else:
            specs.append(None if x is None else layouts[kind])
    present = [i for i, x in enumerate(args) if x is not None]

    def body(*xs):
        full = list(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    return jax.shard_map(body, mesh=rules.mesh, in_specs=tuple(specs[i] for i in present),
                         out_specs=layouts["q"], check_vma=False)(*(args[i] for i in present))


class Attention(nn.Module):
    config: Qwen3Config
    dtype: Any
    param_dtype: Any
    rules: ShardingRules | None
    attn_impl: str
    lora: LoraConfig | None = None
    max_segment: int | None = None  # packed prefill: the longest segment (see `forward`)

    @nn.compact
    def __call__(self, x_BTD, cos, sin, segment_ids, cache, layer, meta):
        c, dt = self.config, self.dtype
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        wq = _param(self, "q", (D, N, H), ("embed", "heads", "head_dim")).astype(dt)
        wk = _param(self, "k", (D, K, H), ("embed", "kv_heads", "head_dim")).astype(dt)
        wv = _param(self, "v", (D, K, H), ("embed", "kv_heads", "head_dim")).astype(dt)
        wo = _param(self, "o", (N, H, D), ("heads", "head_dim", "embed")).astype(dt)
        q = jnp.einsum("BTD,DNH->BTNH", x_BTD, wq)
        k = jnp.einsum("BTD,DKH->BTKH", x_BTD, wk)
        v = jnp.einsum("BTD,DKH->BTKH", x_BTD, wv)
        if self.lora is not None:
            q = _plus_lora(self, "q", q, x_BTD, (D, N, H), 1, ("embed", "heads", "head_dim"))
            k = _plus_lora(self, "k", k, x_BTD, (D, K, H), 1, ("embed", "kv_heads", "head_dim"))
            v = _plus_lora(self, "v", v, x_BTD, (D, K, H), 1, ("embed", "kv_heads", "head_dim"))
        if c.attention_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (N, H), ("heads", "head_dim"), zeros).astype(dt)
            k = k + _param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)
            v = v + _param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)
        q = constrain(q, self.rules, ("act_batch", "act_seq", "act_heads", None))
        k = constrain(k, self.rules, ("act_batch", "act_seq", "act_kv_heads", None))
        v = constrain(v, self.rules, ("act_batch", "act_seq", "act_kv_heads", None))
        # QK-norm over head_dim, before RoPE (HF order).
        q = RMSNorm(c.rms_norm_eps, dt, self.param_dtype, name="q_norm")(q)
        k = RMSNorm(c.rms_norm_eps, dt, self.param_dtype, name="k_norm")(k)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)

        if cache is not None:
            k_pool, v_pool = kernels.write_pages(cache["k"], cache["v"], k, v, meta.slot_mapping, layer=layer)
            cache = {"k": k_pool, "v": v_pool}
        if cache is None or segment_ids is not None:  # no cache, or packed prefill (all keys are new ones)
            window = self.max_segment  # a query's segment starts at most max_segment - 1 tokens back
            impl = kernels.attention_impl(self.attn_impl, q, k, segment_ids=segment_ids, sliding_window=window)

            def attend(q, k, v, seg):
                return kernels.attention(q, k, v, causal=True, segment_ids=seg, sliding_window=window, impl=impl)

            out = _per_shard(self.rules, impl, attend, (q, k, v, segment_ids), ("q", "kv", "kv", "seq"))
        else:
            impl = kernels.paged_attention_impl(self.attn_impl, q, k_pool)

            def attend(q, kp, vp, bt, ln, lyr):
                return kernels.paged_attention(q, kp, vp, bt, ln, layer=lyr, impl=impl)

            out = _per_shard(self.rules, impl, attend, (q, k_pool, v_pool, meta.block_tables, meta.lengths, layer),
                             ("q", "pool", "pool", "seq", "batch", "scalar"))
        out = constrain(out, self.rules, ("act_batch", "act_seq", "act_heads", None))
        y = jnp.einsum("BTNH,NHD->BTD", out, wo)
        if self.lora is not None:
            y = _plus_lora(self, "o", y, out, (N, H, D), 2, ("heads", "head_dim", "embed"))
        if c.attention_bias:
            y = y + _param(self, "o_bias", (D,), ("embed",), nn.initializers.zeros).astype(dt)
        return y, cache


class MLP(nn.Module):
    config: Qwen3Config
    dtype: Any
    param_dtype: Any
    rules: ShardingRules | None
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_BTD):
        D, F, dt = self.config.hidden_size, self.config.intermediate_size, self.dtype
        w_gate = _param(self, "gate", (D, F), ("embed", "mlp")).astype(dt)
        w_up = _param(self, "up", (D, F), ("embed", "mlp")).astype(dt)
        w_down = _param(self, "down", (F, D), ("mlp", "embed")).astype(dt)
        place = functools.partial(constrain, rules=self.rules, names=("act_batch", "act_seq", "act_mlp"))
        if self.lora is None or not {"gate", "up", "down"} & set(self.lora.targets):
            return swiglu(x_BTD, w_gate, w_up, w_down, place)
        gate = _plus_lora(self, "gate", jnp.einsum("BTD,DF->BTF", x_BTD, w_gate), x_BTD, (D, F), 1, ("embed", "mlp"))
        up = _plus_lora(self, "up", jnp.einsum("BTD,DF->BTF", x_BTD, w_up), x_BTD, (D, F), 1, ("embed", "mlp"))
        h = place(jax.nn.silu(gate) * up)
        return _plus_lora(self, "down", jnp.einsum("BTF,FD->BTD", h, w_down), h, (F, D), 1, ("mlp", "embed"))


class MoEBlock(nn.Module):
    config: Qwen3Config
    dtype: Any
    param_dtype: Any
    rules: ShardingRules | None

    @nn.compact
    def __call__(self, x_BTD, routes_BTK=None):
        c, dt = self.config, self.dtype
        B, T, D = x_BTD.shape
        E, F = c.num_experts, c.moe_intermediate_size
        w_router = _param(self, "router", (D, E), ("embed", None)).astype(dt)
        w_gate = _param(self, "gate", (E, D, F), ("expert", "embed", "expert_mlp")).astype(dt)
        w_up = _param(self, "up", (E, D, F), ("expert", "embed", "expert_mlp")).astype(dt)
        w_down = _param(self, "down", (E, F, D), ("expert", "expert_mlp", "embed")).astype(dt)
        x_TD = x_BTD.reshape(B * T, D)
        router_logits_TE = jnp.einsum("TD,DE->TE", x_TD, w_router)
        weights, experts = moe.route(router_logits_TE, c.num_experts_per_tok, c.norm_topk_prob, dt,
                                     None if routes_BTK is None else routes_BTK.reshape(B * T, -1))
        if moe.expert_parallel(self.rules):
            y = moe.expert_parallel_mlp(x_TD, weights, experts, w_gate, w_up, w_down, self.rules)
        else:
            y = moe.grouped_expert_mlp(x_TD, weights, experts, w_gate, w_up, w_down)
        return y.reshape(B, T, D), router_logits_TE, experts.reshape(B, T, -1)


class DecoderLayer(nn.Module):
    """One pre-norm block; called by nn.scan with carry (x, cache, layer index)."""

    config: Qwen3Config
    is_moe: bool
    dtype: Any
    param_dtype: Any
    rules: ShardingRules | None
    attn_impl: str
    collect_hidden: bool
    lora: LoraConfig | None = None
    max_segment: int | None = None

    @nn.compact
    def __call__(self, carry, cos, sin, segment_ids, meta, routes_BTK=None):
        x, cache, layer = carry
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_norm")(x)
        h, cache = Attention(c, dt, pdt, self.rules, self.attn_impl, self.lora, self.max_segment, name="attn")(
            h, cos, sin, segment_ids, cache, layer, meta)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attn_norm")(x)
        if self.is_moe:
            h, router_logits, experts = MoEBlock(c, dt, pdt, self.rules, name="moe")(h, routes_BTK)
        else:
            h, router_logits, experts = MLP(c, dt, pdt, self.rules, self.lora, name="mlp")(h), None, None
        x = constrain(x + h, self.rules, ("act_batch", "act_seq", "act_embed"))
        return (x, cache, layer + 1), (router_logits, experts, x if self.collect_hidden else None)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Qwen3(nn.Module):
    config: Qwen3Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    rules: ShardingRules | None = None
    attn_impl: str = "auto"
    remat: str = "none"
    collect_hidden: bool = False
    lora: LoraConfig | None = None
    max_segment: int | None = None

    @nn.compact
    def __call__(self, input_ids, positions, segment_ids=None, cache=None, meta=None, return_hidden=False,
                 routes=None):
        c, dt = self.config, self.dtype
        V, D = c.vocab_size, c.hidden_size
        embed = _param(self, "embed", (V, D), ("vocab", "embed"))
        x = jnp.take(embed, input_ids, axis=0).astype(dt)  # [B, T, D]
        x = constrain(x, self.rules, ("act_batch", "act_seq", "act_embed"))
        cos, sin = rope.cos_sin(c, positions, dt)

        layer_cls = DecoderLayer
        if self.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        hidden_states = [x] if self.collect_hidden else None
        router_logits, chosen = [], []
        carry = (x, cache, jnp.int32(0))
        moe_seen = 0  # MoE layers before this group: where its slice of `routes` starts
        for g, (is_moe, start, stop) in enumerate(c.layer_groups):
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=stop - start,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            group_routes = None
            if is_moe and routes is not None:
                group_routes = routes[moe_seen:moe_seen + stop - start]
            carry, (rl, ex, hs) = scanned(c, is_moe, dt, self.param_dtype, self.rules, self.attn_impl,
                                          self.collect_hidden, self.lora, self.max_segment, name=f"layers_{g}")(
                carry, cos, sin, segment_ids, meta, group_routes)
            if is_moe:
                router_logits.append(rl)
                chosen.append(ex)
                moe_seen += stop - start
            if self.collect_hidden:
                hidden_states.extend(hs[i] for i in range(stop - start))
        x, cache, _ = carry
        x = RMSNorm(c.rms_norm_eps, dt, self.param_dtype, name="final_norm")(x)
        if self.collect_hidden:
            hidden_states[-1] = x  # HF reports the last layer's output after the final norm
        logits = None
        if not return_hidden:
            if c.is_classifier:  # per-token class scores; sequence scores pool them (qwen_jax.classifier)
                head = _param(self, "score", (D, c.num_labels), ("embed", None))
            else:
                head = embed.T if c.tie_word_embeddings else _param(self, "lm_head", (D, V), ("embed", "vocab"))
            logits = jnp.einsum("BTD,DV->BTV", x, head.astype(dt), preferred_element_type=jnp.float32)
            logits = constrain(logits, self.rules, ("act_batch", "act_seq", "act_vocab"))
        return ForwardOutput(
            logits=logits,
            hidden=x,
            cache=cache,
            router_logits=jnp.concatenate(router_logits, axis=0) if router_logits else None,
            routes=jnp.concatenate(chosen, axis=0) if chosen else None,
            hidden_states=tuple(hidden_states) if self.collect_hidden else None,
        )


def stored_output_head(config: Qwen3Config, params) -> tuple[jax.Array, str]:
    """The output projection as stored, with its axes: (embed [V, D], "VD") when tied, else (lm_head [D, V],
    "DV"). Products written for either layout spare a transposed copy of a [V, D] matrix."""
    if config.is_classifier:
        raise ValueError("a sequence classifier (reward model) has a score head, not an LM head")
    return (params["embed"], "VD") if config.tie_word_embeddings else (params["lm_head"], "DV")


def _default_positions(input_ids):
    B, T = input_ids.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def forward(config: Qwen3Config, params, input_ids, positions=None, segment_ids=None, cache=None,
            meta: AttentionMeta | None = None, *, dtype=None, rules: ShardingRules | None = None,
            attn_impl: str = "auto", remat: str = "none", return_hidden: bool = False,
            output_hidden_states: bool = False, lora: LoraConfig | None = None, routes=None,
            max_segment: int | None = None) -> ForwardOutput:
    """Pure, jittable forward.

    input_ids [B, T] int32; positions [B, T] (default 0..T-1); segment_ids [B, T] (packed documents,
    attention stays within equal ids); cache {"k","v": [L, num_blocks, block_size, Hkv, Hd]} with
    `meta` for the paged path. With a cache and segment_ids together (packed prefill), each segment is a
    new sequence (nothing of it cached before): its keys and values are written at `meta.slot_mapping`,
    and it attends within its segment only, so the pool is not read. `max_segment` (static): no segment
    is longer; passed on as a sliding window (which the segments imply, so the result is the same), it
    lets attention skip keys further back. `dtype` is the compute dtype (default: the params' dtype).
    With `lora`, params must also hold the adapter tensors (`qwen_jax.lora.combine(base, adapters)`).
    `routes` [L_moe, B, T, k] int32 replays given expert choices in the MoE layers (weights still from this
    forward's router); `out.routes` reports the choices made.
    """
    if (cache is None) != (meta is None):
        raise ValueError("cache and meta must be given together")
    if dtype is None:
        dtype = params["embed"].dtype
    if positions is None:
        positions = _default_positions(input_ids)
    model = Qwen3(config, dtype=dtype, param_dtype=params["embed"].dtype, rules=rules, attn_impl=attn_impl,
                  remat=remat, collect_hidden=output_hidden_states, lora=lora, max_segment=max_segment)
    return model.apply({"params": params}, input_ids, positions, segment_ids, cache, meta, return_hidden, routes)


def _boxed_shapes(config: Qwen3Config, param_dtype, lora: LoraConfig | None = None):
    model = Qwen3(config, dtype=param_dtype, param_dtype=param_dtype, lora=lora)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids)["params"])


def abstract_params(config: Qwen3Config, dtype=jnp.float32, lora: LoraConfig | None = None):
    """ShapeDtypeStruct tree of the params (nothing allocated); with `lora`, the adapters are included."""
    return nn.meta.unbox(_boxed_shapes(config, dtype, lora))


def param_logical_axes(config: Qwen3Config, lora: LoraConfig | None = None):
    """Tree (same structure as params) of logical axis-name tuples, e.g. ("layers", "embed", "heads", "head_dim")."""
    specs = nn.get_partition_spec(_boxed_shapes(config, jnp.float32, lora))
    return jax.tree.map(lambda s: tuple(s), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def param_shardings(config: Qwen3Config, rules: ShardingRules, dtype=jnp.float32, lora: LoraConfig | None = None):
    """NamedSharding tree for the params under `rules` (with `lora`: base and adapters together)."""
    shapes = abstract_params(config, dtype, lora)
    axes = param_logical_axes(config, lora)
    return jax.tree.map(lambda s, names: rules.sharding(names, s.shape), shapes, axes,
                        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def init_params(config: Qwen3Config, key: jax.Array, dtype=jnp.float32, rules: ShardingRules | None = None):
    """Random params (normal(0.02) matrices, unit norms), created directly in their sharding if `rules`."""
    model = Qwen3(config, dtype=dtype, param_dtype=dtype)
    ids = jnp.zeros((1, 1), jnp.int32)

    def init():
        return nn.meta.unbox(model.init(key, ids, ids)["params"])

    if rules is None:
        return jax.jit(init)()
    return jax.jit(init, out_shardings=param_shardings(config, rules, dtype))()


def init_lora_params(config: Qwen3Config, lora: LoraConfig, key: jax.Array, dtype=jnp.float32,
                     rules: ShardingRules | None = None):
    """Fresh LoRA adapters only (A random, B zero), in their sharding if `rules`. The base weights this
    init also traces are dead code and never materialised."""
    from qwen_jax import lora as lora_lib

    model = Qwen3(config, dtype=dtype, param_dtype=dtype, lora=lora.validate())
    ids = jnp.zeros((1, 1), jnp.int32)

    def init():
        return lora_lib.split(nn.meta.unbox(model.init(key, ids, ids)["params"]))[1]

    if rules is None:
        return jax.jit(init)()
    shardings = lora_lib.split(param_shardings(config, rules, dtype, lora))[1]
    return jax.jit(init, out_shardings=shardings)()


def init_cache(config: Qwen3Config, num_blocks: int, block_size: int, dtype=jnp.bfloat16,
               rules: ShardingRules | None = None) -> dict[str, jax.Array]:
    """Zeroed paged KV pool {"k", "v"}: [L, num_blocks, block_size, Hkv, Hd], kv heads on `tensor`."""
    shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    if rules is None:
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    sharding = rules.sharding(("layers", "cache_blocks", None, "cache_kv_heads", "head_dim"), shape)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return {"k": make(), "v": make()}
