"""LoRA: zero-initialised B leaves the model unchanged, the merged HF export equals the unmerged adapter
model (read back by transformers), training touches only the adapters, and sharding keeps the result."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from conftest import rel_err
from jax.sharding import PartitionSpec as P
from reference.hf_models import build

import qwen_jax
from qwen_jax import lora as L
from qwen_jax.model import init_lora_params
from train.config import TrainConfig
from train.optim import make_optimizer
from train.placement import put_batch
from train.tasks import LMTask
from train.trainer import init_state, make_train_step


def _perturbed(adapters, seed=0, std=0.3):
    """Random non-zero B (and A) so the adapters actually change the model."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("overrides,targets", [
    (dict(tie_word_embeddings=True), L.LORA_TARGETS),
    (dict(attention_bias=True), ("q", "v", "down")),
    (dict(num_experts=8, mlp_only_layers=[1]), L.LORA_TARGETS),  # MoE layers: attention only; layer 1 dense
], ids=["dense-all", "biased-qv-down", "moe"])
def test_merged_export_matches_adapter_model(tmp_path, overrides, targets, rng):
    _, path = build(tmp_path / "base", num_hidden_layers=2, **overrides)
    cfg, base = qwen_jax.load_pretrained(path, progress=False)
    lora = L.LoraConfig(rank=4, alpha=8.0, targets=targets)
    adapters = init_lora_params(cfg, lora, jax.random.key(1))
    ids = rng.integers(0, cfg.vocab_size, (2, 19))

    plain = qwen_jax.forward(cfg, base, ids).logits
    fresh = qwen_jax.forward(cfg, L.combine(base, adapters), ids, lora=lora).logits
    np.testing.assert_array_equal(np.asarray(fresh), np.asarray(plain))  # B = 0 at the start

    adapters = _perturbed(adapters)
    unmerged = qwen_jax.forward(cfg, L.combine(base, adapters), ids, lora=lora).logits
    assert rel_err(unmerged, plain) > 1e-2  # the adapters matter
    out = tmp_path / "merged"
    qwen_jax.save_pretrained(out, cfg, L.merge(base, adapters, lora), progress=False)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(unmerged, theirs) <= 1e-4


def test_lora_training_changes_only_adapters_and_lowers_loss(tmp_path):
    _, path = build(tmp_path, num_hidden_layers=2)
    cfg, base = qwen_jax.load_pretrained(path, progress=False)
    before = jax.tree.map(np.asarray, base)
    lora = L.LoraConfig(rank=4, alpha=8.0)
    tc = TrainConfig(compute_dtype="float32", seq_len=16, batch_size=4, lr=1e-2, warmup_steps=0, steps=20)
    rules = qwen_jax.ShardingRules(qwen_jax.make_mesh("data=1", devices=jax.devices()[:1]))
    opt = make_optimizer(tc)
    state = init_state(init_lora_params(cfg, lora, jax.random.key(0)), opt, 0)
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.ndim, state["opt_state"]))) <= {0, 3, 4}  # adapters only
    step = make_train_step(cfg, tc, opt, rules, task=LMTask.of(cfg, tc, rules, lora))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 4, 17)).astype(np.int32)
    batch = put_batch({"tokens": tokens, "segment_ids": np.ones_like(tokens)}, rules, lead=1)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch, {"base": base})
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), before)


def test_sharded_lora_step_matches_unsharded(tmp_path):
    _, path = build(tmp_path, num_hidden_layers=2)
    lora = L.LoraConfig(rank=4, alpha=8.0)
    tc = TrainConfig(compute_dtype="float32", seq_len=16, batch_size=4, lr=1e-2, warmup_steps=0, steps=5)
    tokens = np.random.default_rng(0).integers(0, 96, (1, 4, 17)).astype(np.int32)
    results = []
    for spec, n in (("data=1", 1), ("fsdp=2,tensor=4", 8)):
        rules = qwen_jax.ShardingRules(qwen_jax.make_mesh(spec, devices=jax.devices()[:n]))
        cfg, base = qwen_jax.load_pretrained(path, mesh=rules.mesh, progress=False)
        adapters = _perturbed(init_lora_params(cfg, lora, jax.random.key(0), rules=rules), std=0.05)
        if n > 1:  # the adapters are sharded like the weights they adapt
            assert adapters["layers_0"]["attn"]["q_lora_b"].sharding.spec == P(None, None, "tensor", None)
            assert adapters["layers_0"]["mlp"]["down_lora_a"].sharding.spec == P(None, "tensor", None)
        opt = make_optimizer(tc)
        state = init_state(adapters, opt, 0)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        step = make_train_step(cfg, tc, opt, rules, shardings, task=LMTask.of(cfg, tc, rules, lora))
        batch = put_batch({"tokens": tokens, "segment_ids": np.ones_like(tokens)}, rules, lead=1)
        for _ in range(2):
            state, metrics = step(state, batch, {"base": base})
        if n > 1:
            assert jax.tree.map(lambda x: x.sharding, state) == shardings
        results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state["params"])))
    assert rel_err(results[1][0], results[0][0]) <= 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), results[1][1], results[0][1])


def test_lora_config_errors():
    with pytest.raises(qwen_jax.ConfigError, match="unknown LoRA target"):
        L.LoraConfig(targets=("q", "router")).validate()
    with pytest.raises(qwen_jax.ConfigError, match="lora-rank"):
        L.LoraConfig(rank=0).validate()
    assert L.LoraConfig.parse_targets("attn") == ("q", "k", "v", "o")
    assert dataclasses.replace(L.LoraConfig(rank=8, alpha=16), targets=("q",)).scale == 2.0
