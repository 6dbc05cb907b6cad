"""DPO: loss, rewards and gradients against a PyTorch reference on HF models; learning on synthetic pairs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference.hf_models import build, checkpoint_layout

import qwen_jax
from qwen_jax.checkpoint import hf_state_dict
from qwen_jax.lora import LoraConfig
from qwen_jax.model import init_lora_params
from train.data import RowDataset
from train.preference import DPOConfig, DPOTask
from train.config import TrainConfig
from train.trainer import fit

TC = TrainConfig(compute_dtype="float32", seq_len=24, ce_chunk=16)


def _pairs(rng, vocab, n=3, row_len=25):
    """n (chosen, rejected) pairs sharing a prompt, right-padded: tokens/segment_ids/loss_mask [n, 2, row_len]."""
    tokens = np.zeros((n, 2, row_len), np.int32)
    seg, mask = np.zeros_like(tokens), np.zeros((n, 2, row_len), np.int8)
    for i in range(n):
        p = int(rng.integers(3, 9))
        prompt = rng.integers(3, vocab, p)
        for j in range(2):
            r = int(rng.integers(2, row_len - p + 1))
            ids = np.concatenate([prompt, rng.integers(3, vocab, r)])
            tokens[i, j, :len(ids)], seg[i, j, :len(ids)], mask[i, j, p:len(ids)] = ids, 1, 1
    return {"tokens": tokens, "segment_ids": seg, "loss_mask": mask, "weight": np.ones(n, np.float32)}


def _torch_logps(model, batch, average):
    out = []
    for i in range(batch["tokens"].shape[0]):
        for j in range(2):
            n = int(batch["segment_ids"][i, j].sum())
            ids = torch.tensor(batch["tokens"][i, j, :n], dtype=torch.long)[None]
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            tok_lp = logp.gather(-1, ids[0, 1:, None])[:, 0]
            m = torch.tensor(batch["loss_mask"][i, j, 1:n], dtype=torch.float32)
            out.append((tok_lp * m).sum() / (m.sum() if average else 1.0))
    return torch.stack(out).reshape(-1, 2)


def _torch_dpo(pi, ref, cfg: DPOConfig):
    """The published losses, written directly from the papers' definitions."""
    h = (pi[:, 0] - pi[:, 1]) - (ref[:, 0] - ref[:, 1])
    b, eps = cfg.beta, cfg.label_smoothing
    if cfg.loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(b * h) - eps * F.logsigmoid(-b * h)
    elif cfg.loss_type == "ipo":
        losses = (h - 1 / (2 * b)) ** 2
    else:
        losses = torch.relu(1 - b * h)
    r_w, r_l = b * (pi[:, 0] - ref[:, 0]).detach(), b * (pi[:, 1] - ref[:, 1]).detach()
    return losses.mean(), r_w, r_l


@pytest.mark.parametrize("dpo", [DPOConfig(beta=0.1, loss_type="sigmoid", label_smoothing=0.1),
                                 DPOConfig(beta=0.5, loss_type="ipo"), DPOConfig(beta=0.3, loss_type="hinge")],
                         ids=lambda d: d.loss_type)
def test_dpo_loss_rewards_and_gradients_match_pytorch(tmp_path, dpo, rng):
    policy_hf, ppath = build(tmp_path / "policy", seed=0, num_hidden_layers=2)
    ref_hf, rpath = build(tmp_path / "ref", seed=1, num_hidden_layers=2)
    cfg, policy = qwen_jax.load_pretrained(ppath, progress=False)
    _, ref = qwen_jax.load_pretrained(rpath, progress=False)
    batch = _pairs(rng, cfg.vocab_size)
    task = DPOTask.of(cfg, TC, None, dpo)
    mb = jax.tree.map(jnp.asarray, batch)
    (loss, sums), grads = jax.value_and_grad(task.loss, has_aux=True)(policy, {"ref": ref}, mb, 3.0, 1)

    average = dpo.loss_type == "ipo"
    policy_hf.train()
    pi = _torch_logps(policy_hf, batch, average)
    with torch.no_grad():
        ref_lp = _torch_logps(ref_hf, batch, average)
    t_loss, r_w, r_l = _torch_dpo(pi, ref_lp, dpo)
    t_loss.backward()

    assert rel_err(loss, t_loss.item()) <= 1e-4
    # A reward sum is a sum of differences of log-prob sums and can nearly cancel: its error is held
    # relative to the magnitude of the log-probs it is made of (measured: <= 5e-8 of it).
    scale = dpo.beta * float((pi.detach().abs() + ref_lp.abs()).sum())
    for name, theirs in (("chosen", r_w.sum()), ("rejected", r_l.sum()), ("margin", (r_w - r_l).sum())):
        assert abs(float(sums[f"rewards/{name}"]) - theirs.item()) <= 1e-6 * scale, name
    assert float(sums["rewards/accuracy"]) == float((r_w > r_l).sum())
    assert rel_err(sums["logps/chosen"], pi[:, 0].sum().item()) <= 1e-4
    ours = hf_state_dict(cfg, grads)
    theirs = checkpoint_layout({k: p.grad.numpy() for k, p in policy_hf.named_parameters()})
    assert set(ours) == set(theirs)
    for k in theirs:
        assert rel_err(ours[k], theirs[k]) <= 1e-4, k


def _synthetic_preferences(rng, vocab, n, prompt_len=6, resp_len=6):
    """Chosen responses use even token ids, rejected ones odd ids, after a random prompt: a preference a
    random model knows nothing about, which generalises to unseen pairs."""
    row = prompt_len + resp_len
    tokens = np.zeros((n, 2, row), np.int32)
    even, odd = np.arange(4, vocab, 2), np.arange(5, vocab, 2)
    for i in range(n):
        prompt = rng.integers(4, vocab, prompt_len)
        tokens[i, 0] = np.concatenate([prompt, rng.choice(even, resp_len)])
        tokens[i, 1] = np.concatenate([prompt, rng.choice(odd, resp_len)])
    mask = np.zeros_like(tokens, np.int8)
    mask[:, :, prompt_len:] = 1
    return RowDataset({"tokens": tokens, "segment_ids": np.ones_like(tokens), "loss_mask": mask,
                       "weight": np.ones(n, np.float32)})


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_dpo_raises_held_out_reward_accuracy(tmp_path, lora_rank):
    """Figures (seed 0): held-out reward accuracy 0 at the start (policy = reference), ~1.0 after 30 steps."""
    cfg = qwen_jax.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    train_ds, eval_ds = _synthetic_preferences(rng, 64, 256), _synthetic_preferences(rng, 64, 64)
    tc = dataclasses.replace(TC, steps=30, seq_len=11, batch_size=16, lr=3e-3 if lora_rank else 1e-3,
                             warmup_steps=3, weight_decay=0.0, log_every=10, save_every=100, eval_batches=100)
    rules = qwen_jax.ShardingRules(qwen_jax.make_mesh("data=1", devices=jax.devices()[:1]))
    params = qwen_jax.init_params(cfg, jax.random.key(0))
    lora = LoraConfig(rank=lora_rank, alpha=8.0) if lora_rank else None
    if lora:
        trainable, frozen = init_lora_params(cfg, lora, jax.random.key(1)), {"base": params}
    else:
        trainable, frozen = params, {"ref": jax.tree.map(jnp.copy, params)}
    task = DPOTask.of(cfg, tc, rules, DPOConfig(beta=0.5), lora)
    result = fit(cfg, tc, trainable, train_ds, eval_ds, str(tmp_path), rules, progress=False, task=task,
                 frozen=frozen)
    ev = result["eval"]
    assert ev["eval_rewards/accuracy"] >= 0.9, ev
    assert ev["eval_rewards/margin"] > 0 and ev["eval_loss"] < np.log(2), ev  # log 2: the loss at h = 0
