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
def test_sharded_forward_equals_unsharded(tmp_path, mesh_spec, overrides):
    _, src = build(tmp_path, num_hidden_layers=2, **overrides)
    cfg, params = qwen_jax.load_pretrained(src, progress=False)
    ids = jnp.asarray(np.random.default_rng().integers(0, cfg.vocab_size, (4, 16)), jnp.int32)
    ref = jax.jit(lambda p, x: qwen_jax.forward(cfg, p, x).logits)(params, ids)

    rules = ShardingRules(make_mesh(mesh_spec))
    sharded = jax.device_put(params, qwen_jax.param_shardings(cfg, rules))
    ids_sharded = jax.device_put(ids, rules.sharding(("act_batch", "act_seq"), ids.shape))
    fwd = jax.jit(lambda p, x: qwen_jax.forward(cfg, p, x, rules=rules).logits)
    out = fwd(sharded, ids_sharded)
    assert isinstance(out.sharding, NamedSharding)
    assert rel_err(out, ref) <= 1e-5
