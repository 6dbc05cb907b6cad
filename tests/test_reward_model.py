"""Reward models: HF Qwen3ForSequenceClassification import, export and scores against transformers, the
pairwise loss and its gradients against PyTorch, train.rm learning the shipped pairs, and a reward model's
scores as a GRPO reward (the GRPO run with a reward model: tests/test_grpo.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err
from reference.hf_models import build

import qwen_jax
from qwen_jax.checkpoint import hf_state_dict
from qwen_jax.classifier import sequence_scores
from qwen_jax.errors import ConfigError
from train.reward_model import RewardModelReward, RewardModelTask
from train.tasks import ForwardOptions


def _padded(rng, vocab, lengths, T, pad=0):
    tokens = np.full((len(lengths), T), pad, np.int64)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(1, vocab, n)
    return tokens


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_scores_import_and_export_equal_transformers(tmp_path, kind, rng):
    hf, path = build(tmp_path / "hf", classifier=True, moe=kind == "moe")
    config, params = qwen_jax.load_pretrained(path)
    assert config.num_labels == 1 and config.architecture.endswith("ForSequenceClassification")
    assert "lm_head" not in params and params["score"].shape == (config.hidden_size, 1)
    tokens = _padded(rng, config.vocab_size, [5, 17, 32, 9], 32)
    tokens[3, :3] = 0  # left padding too: HF scores the rightmost non-pad token
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()  # [B, 1]
    got = np.asarray(sequence_scores(config, params, jnp.asarray(tokens, jnp.int32)))
    assert rel_err(got, want) <= 1e-4, (got, want)
    qwen_jax.save_pretrained(tmp_path / "ours", config, params, progress=False)
    from transformers import AutoModelForSequenceClassification

    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == type(hf).__name__
    with torch.no_grad():  # the same weights; transformers' reloaded MoE may take another experts code path
        assert rel_err(back(torch.tensor(tokens)).logits.numpy(), want) <= 1e-5
    if kind == "dense":  # the engine generates with causal LMs only, and says so before reading weights
        from infer import LLM

        with pytest.raises(ConfigError, match="ForSequenceClassification .a reward model or classifier.: it scores"):
            LLM(path, max_model_len=64)


def test_pairwise_loss_and_gradients_match_pytorch(tmp_path, rng):
    """-log sigmoid(r_w - r_l) + c (r_w + r_l)^2 over padded pairs, our task against transformers + autograd."""
    hf, path = build(tmp_path, classifier=True)
    config, params = qwen_jax.load_pretrained(path)
    N, T, center = 3, 24, 0.05
    tokens = _padded(rng, config.vocab_size, rng.integers(4, T + 1, 2 * N), T).reshape(N, 2, T)
    r = hf(torch.tensor(tokens.reshape(2 * N, T))).logits[:, 0].reshape(N, 2)
    want = torch.mean(-torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]) + center * (r[:, 0] + r[:, 1]) ** 2)
    want.backward()
    task = RewardModelTask(config, ForwardOptions(), center)
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": jnp.asarray(tokens != 0, jnp.int32),
             "weight": jnp.ones(N)}
    (loss, sums), grads = jax.value_and_grad(
        lambda p: task.loss(p, None, batch, task.normalizer(batch), 1), has_aux=True)(params)
    assert abs(float(loss) - want.item()) <= 1e-5 * abs(want.item())
    ours = hf_state_dict(config, grads)
    for name, p in hf.named_parameters():
        assert rel_err(ours[name], p.grad.numpy()) <= 1e-4, name
    r = r.detach().numpy()
    if np.abs(r[:, 0] - r[:, 1]).min() > 1e-4:  # no near-tie that rounding could flip
        assert float(sums["accuracy"]) == float(np.sum(r[:, 0] > r[:, 1]))


def test_a_reward_model_scores_conversations_in_its_own_chat_template(shipped_reward_model):
    path, config, params, tok = shipped_reward_model
    reward = RewardModelReward(path, None, batch_size=2, progress=False)
    msgs = [{"role": "user", "content": "Speak, ROMEO."}]
    prompts = [tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), "JULIET.\n"]
    completions = ["My love is deep.", "Wherefore art thou"]
    infos = [{"messages": msgs}, {}]
    got = reward(prompts, completions, infos)
    texts = [tok.apply_chat_template(msgs + [{"role": "assistant", "content": completions[0]}], tokenize=False),
             prompts[1] + completions[1]]
    for text, g in zip(texts, got):
        ids = jnp.asarray([tok.encode(text)], jnp.int32)
        assert abs(g - float(sequence_scores(config, params, ids)[0, 0])) <= 1e-5
    assert len(set(got)) == 2


def test_train_rm_learns_the_shipped_pairs_and_exports_a_transformers_classifier(tmp_path, capfd):
    """With LoRA (the adapters and the score head train; the export merges them): held-out pair accuracy
    rises from where the fresh head starts, and transformers scores the export as we do."""
    from transformers import AutoModelForSequenceClassification

    from train import rm

    out = tmp_path / "rm"
    rc = rm.main(["--steps", "6", "--batch-size", "8", "--lora-rank", "8", "--lr", "2e-3", "--eval-fraction", "0.05",
                  "--no-progress", "--out", str(out)])
    stdout, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    start, end = summary["eval_start"]["eval_accuracy"], summary["eval"]["eval_accuracy"]
    assert end >= 0.75 and end >= start + 0.15, (start, end)
    config, params = qwen_jax.load_pretrained(out / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    tok = qwen_jax.load_tokenizer(out / "hf")
    tokens = np.full((2, 40), config.pad_token_id, np.int64)
    for i, text in enumerate(["ROMEO.\nBut soft, what light", "JULIET.\nO Romeo, Romeo"]):
        ids = tok.encode(text)
        tokens[i, :len(ids)] = ids
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    assert rel_err(np.asarray(sequence_scores(config, params, jnp.asarray(tokens, jnp.int32))), want) <= 1e-4

