"""Training numerics against PyTorch: loss, gradients, AdamW steps, accumulation, packing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import qwen_jax
from conftest import rel_err
from qwen_jax.checkpoint import hf_state_dict
from qwen_jax.sharding import ShardingRules, make_mesh
from reference.hf_models import build, checkpoint_layout
from train.config import TrainConfig
from train.optim import lr_schedule, make_optimizer
from train.placement import put_batch
from train.tasks import ForwardOptions, lm_loss_terms
from train.trainer import init_state, make_train_step, state_shardings

TC = TrainConfig(steps=5, seq_len=16, batch_size=2, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1,
                 clip_norm=1.0, compute_dtype="float32", ce_chunk=8)


def _torch_loss(model, tokens, coef=None):
    """HF model + torch cross-entropy (+ transformers' load-balancing loss for MoE), on inputs tokens[:, :-1]."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    out = model(torch.tensor(tokens[:, :-1]), output_router_logits=coef is not None)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                           torch.tensor(tokens[:, 1:]).reshape(-1))
    if coef is None:
        return ce
    cfg = model.config
    return ce + coef * load_balancing_loss_func(out.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)


@pytest.mark.parametrize("overrides", [dict(tie_word_embeddings=True), dict(num_experts=8, norm_topk_prob=False)])
def test_loss_and_gradients_match_pytorch(tmp_path, overrides, rng):
    model, path = build(tmp_path, num_hidden_layers=2, **overrides)
    cfg, params = qwen_jax.load_pretrained(path, progress=False)
    tokens = rng.integers(0, cfg.vocab_size, (2, 17))
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": jnp.ones((2, 17), jnp.int32)}
    coef = cfg.router_aux_loss_coef if cfg.is_moe else None

    def objective(p):
        loss, _, _, aux, n = lm_loss_terms(cfg, p, batch, ForwardOptions.of(TC, None))
        return loss / n + (coef * aux if coef else 0.0)

    loss, grads = jax.value_and_grad(objective)(params)
    model.train()
    ref = _torch_loss(model, tokens, coef)
    ref.backward()
    assert rel_err(loss, ref.item()) <= 1e-5
    ours = hf_state_dict(cfg, grads)
    theirs = checkpoint_layout({k: p.grad.numpy() for k, p in model.named_parameters()})
    assert set(ours) == set(theirs)
    for k in theirs:
        assert rel_err(ours[k], theirs[k]) <= 1e-4, k


# Adam divides m by sqrt(v) + eps. With the default eps=1e-8, a gradient element of ~1e-8 turns the float32
# summation noise in it (both sides sum in different orders) into an O(lr) difference in its update: we
# measured 5e-5 to 6e-4 relative, varying with the random inputs. With eps=1e-4 every update is smooth in the
# gradient, so the comparison is tight and stable, while a wrong weight-decay mask would still show at ~1e-3.
# The optimizer's arithmetic does not depend on eps's value.
@pytest.mark.parametrize("eps,tol", [(1e-4, 5e-5)])
def test_adamw_steps_match_torch(tmp_path, eps, tol, rng):
    tc = dataclasses.replace(TC, eps=eps)
    model, path = build(tmp_path, num_hidden_layers=2, tie_word_embeddings=False)
    cfg, params = qwen_jax.load_pretrained(path, progress=False)
    batches = [rng.integers(0, cfg.vocab_size, (2, 17)) for _ in range(3)]

    initial = hf_state_dict(cfg, params)  # the train step donates (consumes) the state
    rules = ShardingRules(make_mesh("data=1", devices=jax.devices()[:1]))
    opt = make_optimizer(tc)
    state = init_state(params, opt, 0)
    step = make_train_step(cfg, tc, opt, rules)
    for b in batches:
        batch = {"tokens": b[None].astype(np.int32), "segment_ids": np.ones((1, 2, 17), np.int32)}
        state, _ = step(state, put_batch(batch, rules, (None, "act_batch", None)))

    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=tc.lr, betas=(tc.b1, tc.b2), eps=tc.eps)
    sched = lr_schedule(tc)
    lam = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda s: float(sched(s)) / tc.lr)
    model.train()
    for b in batches:
        torch_opt.zero_grad()
        _torch_loss(model, b).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
        torch_opt.step()
        lam.step()
    ours = hf_state_dict(cfg, state["params"])
    moved = 0
    for k, p in model.named_parameters():
        theirs = p.detach().numpy()
        assert rel_err(ours[k], theirs) <= tol, k
        moved += not np.allclose(theirs, initial[k])
    assert moved == len(ours)  # every tensor was updated


def test_grad_accumulation_equals_full_batch(tmp_path, rng):
    _, path = build(tmp_path, num_hidden_layers=2)
    cfg, params = qwen_jax.load_pretrained(path, progress=False)
    tokens = rng.integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[1, 9:] = 2  # a document boundary changes the token count per micro-batch
    rules = ShardingRules(make_mesh("data=1", devices=jax.devices()[:1]))
    results = []
    for accum in (1, 2, 4):
        tc = dataclasses.replace(TC, batch_size=4, grad_accum=accum)
        opt = optax.sgd(1.0)  # the parameter change is exactly -grad (Adam would amplify float noise)
        state, metrics = make_train_step(cfg, tc, opt, rules)(
            init_state(jax.tree.map(jnp.copy, params), opt, 0),
            put_batch({"tokens": tokens.reshape(accum, 4 // accum, -1), "segment_ids": seg.reshape(accum, 4 // accum, -1)},
                      rules, (None, "act_batch", None)))
        results.append((float(metrics["loss"]), jax.tree.leaves(state["params"])))
    for loss, leaves in results[1:]:
        assert rel_err(loss, results[0][0]) < 1e-6
        for a, b in zip(leaves, results[0][1]):
            assert rel_err(a, b) < 1e-5


def test_packed_rows_equal_separate_documents(tmp_path, rng):
    _, path = build(tmp_path, num_hidden_layers=2, num_experts=4)
    cfg, params = qwen_jax.load_pretrained(path, progress=False)
    a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 10)

    def terms(tokens, seg):
        batch = {"tokens": jnp.asarray(tokens[None], jnp.int32), "segment_ids": jnp.asarray(seg[None], jnp.int32)}
        _, ce, _, _, n = lm_loss_terms(cfg, params, batch, ForwardOptions.of(TC, None))
        return float(ce), int(n)

    packed = terms(np.concatenate([a, b]), np.asarray([1] * 7 + [2] * 10))
    sep_a, sep_b = terms(a, np.ones(7)), terms(b, np.ones(10))
    assert packed[1] == sep_a[1] + sep_b[1] == 15  # the cross-document target is not counted
    assert rel_err(packed[0], sep_a[0] + sep_b[0]) < 1e-5


@pytest.mark.parametrize("mesh_spec,overrides", [("fsdp=2,tensor=4", dict(num_experts=8)),
                                                 ("data=2,expert=4", dict(num_experts=8)),
                                                 ("expert=2,tensor=4", dict(num_experts=8))])
def test_sharded_step_keeps_placement_and_matches_unsharded(tmp_path, mesh_spec, overrides, rng):
    _, path = build(tmp_path, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, **overrides)
    cfg, params = qwen_jax.load_pretrained(path, progress=False)
    tokens = rng.integers(0, cfg.vocab_size, (1, 4, 17)).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens)}
    tc = dataclasses.replace(TC, batch_size=4, eps=1e-4)  # eps: see test_adamw_steps_match_torch
    results = []
    for spec in ("data=1", mesh_spec):
        rules = ShardingRules(make_mesh(spec, devices=jax.devices()[: 1 if spec == "data=1" else 8]))
        opt = make_optimizer(tc)
        placed = jax.device_put(jax.tree.map(jnp.copy, params), qwen_jax.param_shardings(cfg, rules))
        state = init_state(placed, opt, 0)
        before = state_shardings(state)
        step = make_train_step(cfg, tc, opt, rules, before)
        for _ in range(2):
            state, metrics = step(state, put_batch(batch, rules, (None, "act_batch", None)))
        for want, got in zip(jax.tree.leaves(before), jax.tree.leaves(state_shardings(state))):
            assert got.is_equivalent_to(want, 4) or got == want
        results.append((float(metrics["loss"]), hf_state_dict(cfg, state["params"])))
    mu_spec = state["opt_state"][1][0].mu["layers_0"]["moe"]["gate"].sharding.spec  # Adam moments stay sharded
    assert mu_spec == state["params"]["layers_0"]["moe"]["gate"].sharding.spec
    assert any(a is not None for a in mu_spec)
    assert rel_err(results[1][0], results[0][0]) < 1e-5
    for k in results[0][1]:
        assert rel_err(results[1][1][k], results[0][1][k]) < 1e-4, k
