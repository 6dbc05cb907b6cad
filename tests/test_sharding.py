"""Logical-axis sharding on 8 fake CPU devices: sharded forward == unsharded forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import qwen_jax
from conftest import rel_err
from qwen_jax import ConfigError, ShardingRules, make_mesh
from qwen_jax.sharding import parse_mesh_spec
from reference.hf_models import build


def test_eight_fake_devices():
    assert len(jax.devices()) == 8


def test_mesh_spec_parsing():
    assert parse_mesh_spec("data=2,tensor=4") == {"data": 2, "tensor": 4}
    assert dict(make_mesh("tensor=4,data=-1").shape) == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
    assert dict(make_mesh("").shape)["data"] == 8
    for bad, msg in [("tensor=3", "needs 3 devices"), ("tensr=4", "expected entries"),
                     ("tensor=x", "must be an integer"), ("tensor=4,tensor=2", "once")]:
        with pytest.raises(ConfigError, match=msg):
            make_mesh(bad)


def test_rules_replicate_dims_the_axis_does_not_divide():
    rules = ShardingRules(make_mesh("data=2,tensor=4"))
    assert rules.spec(("layers", "embed", "heads", "head_dim"), (2, 64, 8, 16)) == P(None, None, "tensor", None)
    assert rules.spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16)) == P(None, None, None, None)
    assert rules.spec(("act_batch", "act_seq", "act_embed"), (4, 8, 64)) == P("data", None, None)
    fsdp = ShardingRules(make_mesh("fsdp=2,tensor=4"))
    assert fsdp.spec(("vocab", "embed"), (96, 64)) == P("tensor", "fsdp")


@pytest.mark.parametrize("mesh_spec,overrides", [
    ("tensor=4,data=2", dict(num_attention_heads=8, num_key_value_heads=4)),
    ("tensor=4,data=2", dict(num_attention_heads=8, num_key_value_heads=2)),  # kv heads replicated
    ("tensor=4,data=2", dict(num_experts=8, num_attention_heads=8, num_key_value_heads=4)),
    ("fsdp=2,tensor=4", dict(num_experts=8, tie_word_embeddings=True)),
    ("expert=4,data=2", dict(num_experts=8)),
])
def test_sharded_forward_equals_unsharded(tmp_path, mesh_spec, overrides, rng):
    _, src = build(tmp_path, num_hidden_layers=2, **overrides)
    cfg, params = qwen_jax.load_pretrained(src, progress=False)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 16)), jnp.int32)
    ref = jax.jit(lambda p, x: qwen_jax.forward(cfg, p, x).logits)(params, ids)

    rules = ShardingRules(make_mesh(mesh_spec))
    sharded = jax.device_put(params, qwen_jax.param_shardings(cfg, rules))
    ids_sharded = jax.device_put(ids, rules.sharding(("act_batch", "act_seq"), ids.shape))
    fwd = jax.jit(lambda p, x: qwen_jax.forward(cfg, p, x, rules=rules).logits)
    out = fwd(sharded, ids_sharded)
    assert isinstance(out.sharding, NamedSharding)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("mesh_spec,heads,kv_heads,local", [
    ("data=4,tensor=2", 4, 2, (1, 2, 1)),  # batch and heads split; each device keeps its heads' kv head
    ("data=2,tensor=4", 4, 2, (2, 4, 2)),  # 2 kv heads cannot go to 4 devices: heads stay whole
])
def test_pallas_kernels_run_per_shard(rng, mesh_spec, heads, kv_heads, local):
    """A Pallas kernel is opaque to XLA's partitioner, so the model runs it per shard (shard_map): each
    call sees its device's batch rows and heads, and the result equals the unsharded one. The kernels
    themselves are tested in tests/test_*_kernel.py; here the references stand in for them (the GPU
    interpreter cannot run on several simulated devices at once)."""
    import kernels
    from qwen_jax.model import _per_shard

    rules = ShardingRules(make_mesh(mesh_spec))
    B, T, D, L, NB, BS = 4, 8, 16, 2, 12, 4
    q = jnp.asarray(rng.standard_normal((B, T, heads, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, T, kv_heads, D)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[0] * 5 + [1] * 3], B, 0), jnp.int32)
    pools = [jnp.asarray(rng.standard_normal((L, NB, BS, kv_heads, D)), jnp.float32) for _ in range(2)]
    tables = jnp.asarray(rng.permutation(NB)[:B * 3].reshape(B, 3), jnp.int32)
    lengths = jnp.asarray([3, 12, 7, 9], jnp.int32)
    seen = []

    def attend(q, k, v, seg):
        seen.append((q.shape[0], q.shape[2], k.shape[2]))
        return kernels.attention_reference(q, k, v, segment_ids=seg)

    def paged(q, kp, vp, bt, ln, layer):
        seen.append((q.shape[0], q.shape[2], kp.shape[-2]))
        return kernels.paged_attention_reference(q, kp, vp, bt, ln, layer=layer)

    got = jax.jit(lambda *a: _per_shard(rules, "pallas", attend, a, ("q", "kv", "kv", "seq")))(q, k, v, seg)
    assert seen.pop() == local
    assert rel_err(got, kernels.attention_reference(q, k, v, segment_ids=seg)) <= 1e-5
    args = (q[:, -1:], *pools, tables, lengths, jnp.int32(1))
    got = jax.jit(lambda *a: _per_shard(rules, "pallas", paged, a,
                                        ("q", "pool", "pool", "seq", "batch", "scalar")))(*args)
    assert seen.pop() == local
    assert rel_err(got, kernels.paged_attention_reference(*args[:5], layer=1)) <= 1e-5
    assert _per_shard(rules, "xla", attend, (q, k, v, seg), ("q", "kv", "kv", "seq")) is not None
    assert seen.pop() == (B, heads, kv_heads)  # XLA partitions the reference itself: no shard_map


def test_expert_parallelism_moves_tokens_not_weights(tmp_path, rng):
    """Under an `expert` mesh axis each device keeps its experts: the compiled forward's collectives carry
    tokens ([rows, hidden]) only, never an expert weight matrix ([.., hidden, width] or [.., width,
    hidden]), and the logits equal the unsharded ones."""
    import re

    _, src = build(tmp_path, num_hidden_layers=2, num_experts=8, moe_intermediate_size=48)
    cfg, params = qwen_jax.load_pretrained(src, progress=False)
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 16)), jnp.int32)
    ref = jax.jit(lambda p, x: qwen_jax.forward(cfg, p, x).logits)(params, ids)
    rules = ShardingRules(make_mesh("expert=4,data=2"))
    sharded = jax.device_put(params, qwen_jax.param_shardings(cfg, rules))
    ids = jax.device_put(ids, rules.sharding(("act_batch", "act_seq"), ids.shape))
    fwd = jax.jit(lambda p, x: qwen_jax.forward(cfg, p, x, rules=rules).logits)
    hlo = fwd.lower(sharded, ids).compile().as_text()
    shapes = [tuple(int(n) for n in m.group(1).split(",") if n)
              for m in re.finditer(r"= \(?[a-z0-9]+\[([\d,]*)\][^=]*?\b(?:all-gather|all-reduce|reduce-scatter|"
                                   r"all-to-all|collective-permute)(?:-start)?\(", hlo)]
    assert shapes, "expected the token all-gather / reduce-scatter"
    weight_like = [s for s in shapes if s[-2:] in ((D, F), (F, D))]
    assert not weight_like, f"expert weights move between devices: {weight_like}"
    assert rel_err(fwd(sharded, ids), ref) <= 1e-5
