"""GRPO: the loss and its gradients against a PyTorch reference written from the DeepSeekMath paper, the
rewards, the engine's parameter updates, the rollout = trainer log-prob contract, and learning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err
from reference.hf_models import build, checkpoint_layout

import qwen_jax
from infer.engine import Engine
from infer.sampling import SamplingParams
from qwen_jax.checkpoint import hf_state_dict
from qwen_jax.errors import ConfigError, DataError
from qwen_jax.lora import LoraConfig
from qwen_jax.model import init_lora_params
from train import rewards as R
from train.config import TrainConfig
from train.rl import GRPOConfig, GRPOTask, group_advantages
from train.rollout import Prompt, RolloutConfig, RolloutSource
from train.trainer import fit

TC = TrainConfig(compute_dtype="float32", seq_len=23, ce_chunk=16)


def _rollouts(rng, vocab, P=2, G=3, row_len=24):
    """P prompts x G completions, right-padded rows [P*G, row_len], with rewards [P, G]."""
    n = P * G
    tokens, seg, mask = (np.zeros((n, row_len), np.int32) for _ in range(3))
    for i in range(P):
        p = int(rng.integers(3, 8))
        prompt = rng.integers(3, vocab, p)
        for g in range(G):
            k = int(rng.integers(2, row_len - p + 1))
            r = i * G + g
            tokens[r, :p + k], seg[r, :p + k], mask[r, p:p + k] = np.concatenate([prompt, rng.integers(3, vocab, k)]), 1, 1
    return {"tokens": tokens, "segment_ids": seg, "loss_mask": mask.astype(np.int8)}, rng.random((P, G))


def _torch_token_logps(model, rows):
    """[n, T] log-probs of every target token (0 where there is no real token)."""
    out = torch.zeros(rows["tokens"].shape[0], rows["tokens"].shape[1] - 1)
    for r in range(rows["tokens"].shape[0]):
        n = int(rows["segment_ids"][r].sum())
        ids = torch.tensor(rows["tokens"][r, :n], dtype=torch.long)[None]
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        out = out.index_put((torch.tensor([r]), torch.arange(n - 1)), logp.gather(-1, ids[0, 1:, None])[:, 0])
    return out


def _torch_grpo(logp, old, ref, rewards, mask, cfg: GRPOConfig):
    """The GRPO objective as published (DeepSeekMath, eq. 3 with the k3 KL of eq. 4), with DAPO's asymmetric
    clip and token-level averaging as options; returns the loss (the negated objective)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    adv = (r - r.mean(1, keepdim=True))
    if cfg.scale_std:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)  # torch.std is the sample std
    adv = adv.reshape(-1, 1).float()
    ratio = torch.exp(logp - old)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    objective = (surrogate - cfg.beta * kl) * mask
    if cfg.aggregation == "sequence":
        return -(objective.sum(1) / mask.sum(1)).mean()
    return -objective.sum() / mask.sum()


@pytest.mark.parametrize("cfg", [GRPOConfig(group_size=3, beta=0.04, eps_low=0.2, eps_high=0.28),
                                 GRPOConfig(group_size=3, beta=0.0, scale_std=False, aggregation="sequence")],
                         ids=["token-kl-cliphigher", "sequence-drgrpo"])
def test_grpo_loss_and_gradients_match_pytorch(tmp_path, cfg, rng):
    policy_hf, path = build(tmp_path / "policy", seed=0, num_hidden_layers=2)
    ref_hf, _ = build(tmp_path / "ref", seed=1, num_hidden_layers=2)
    config, policy = qwen_jax.load_pretrained(path, progress=False)
    rows, rewards = _rollouts(rng, config.vocab_size)
    mask = torch.tensor(rows["loss_mask"][:, 1:], dtype=torch.float32)
    with torch.no_grad():
        behaviour = _torch_token_logps(policy_hf, rows)
        ref = _torch_token_logps(ref_hf, rows)
    old = behaviour + torch.tensor(rng.uniform(-0.4, 0.4, behaviour.shape), dtype=torch.float32) * mask  # ratios != 1
    batch = {**rows, "old_logps": old.numpy(), "ref_logps": ref.numpy(), "weight": np.ones(len(old), np.float32),
             "advantages": group_advantages(rewards, cfg.scale_std).reshape(-1)}

    policy_hf.train()
    t_loss = _torch_grpo(_torch_token_logps(policy_hf, rows), old, ref, rewards, mask, cfg)
    t_loss.backward()
    theirs = checkpoint_layout({k: p.grad.numpy() for k, p in policy_hf.named_parameters()})
    longest = int(rows["loss_mask"].sum(1).max())  # the LM head on the completion window only, or everywhere
    for window in (0, longest):
        task = GRPOTask.of(config, TC, None, cfg, window=window)
        mb = jax.tree.map(jnp.asarray, batch)
        (loss, sums), grads = jax.value_and_grad(task.loss, has_aux=True)(policy, None, mb, task.normalizer(mb), 1)
        assert abs(float(loss) - t_loss.item()) <= 1e-5, (window, float(loss), t_loss.item())
        assert 0 < float(sums["clip_fraction"]) < float(sums["tokens"])  # the clip is exercised
        ours = hf_state_dict(config, grads)
        for k in theirs:
            assert rel_err(ours[k], theirs[k]) <= 1e-4, (window, k)


def test_rewards():
    info = {"answer": "1/2", "completion_tokens": 10, "completion_token_ids": [2, 3, 4, 6]}
    assert R.math_reward("", "so the answer is \\boxed{0.5}.", info) == 1.0
    assert R.math_reward("", "<think>maybe 7</think> it is \\boxed{\\frac{1}{2}}", info) == 1.0
    assert R.math_reward("", "we get 3, then 0.50", info) == 1.0  # the last number
    assert R.math_reward("", "\\boxed{2}", info) == 0.0 and R.math_reward("", "no number", info) == 0.0
    assert R.math_reward("", "\\boxed{x+1}", {"answer": "x + 1"}) == 1.0  # text, normalised
    assert R.math_reward("", "1,234", {"answer": 1234}) == 1.0
    assert R.format_reward("", "<think>a</think>\nanswer", info) == 1.0
    for bad in ("answer only", "<think>a</think>", "<think>a<think>b</think> x", "x <think>a</think> y"):
        assert R.format_reward("", bad, info) == 0.0, bad
    length = R.length_reward(8)
    assert length("", "", info) == -0.25 and length("", "", {"completion_tokens": 8}) == 0.0
    assert length("", "", {"completion_tokens": 100}) == -1.0
    assert R.even_tokens_reward("", "", info) == 0.75
    rs = R.parse_rewards(["math", "format=0.1", "train.demo.rewards:love_words=2"], 16)
    assert [(r.name, r.weight) for r in rs] == [("math", 1.0), ("format", 0.1), ("train.demo.rewards:love_words", 2.0)]
    items = [R.Scored("p", "<think>x</think> my love, \\boxed{0.5}", info, "f.jsonl:3"),
             R.Scored("p", "no", {**info, "answer": 1}, "f.jsonl:4")]
    values = R.score(rs, items)
    assert list(values["math"]) == [1.0, 0.0] and list(values["format"]) == [1.0, 0.0]
    love = values["train.demo.rewards:love_words"]
    assert love[0] > 0 and love[1] == 0
    assert np.allclose(R.total(rs, values), [1.1 + 2 * love[0], 0.0])
    for spec, msg in (("nope", "unknown reward"), ("math=x", "not a number"), ("os:nope", "cannot import"),
                      ("no_such_module_x:f", "cannot import")):
        with pytest.raises(ConfigError, match=msg):
            R.parse_rewards([spec], 16)
    for fn, msg in ((lambda p, c, i: 1 / 0, "reward boom failed on f.jsonl:3: ZeroDivisionError"),
                    (lambda p, c, i: float("nan"), "returned nan on f.jsonl:3"),
                    (lambda p, c, i: "1", "returned '1' on f.jsonl:3")):
        with pytest.raises(DataError, match=msg):
            R.score([R.Reward("boom", fn, 1.0)], [R.Scored("p", "c", info, "f.jsonl:3")])

    class Batched:  # a reward over the whole batch, as a reward model is
        batched = True

        def __init__(self, out):
            self.out = out

        def __call__(self, prompts, completions, infos):
            return self.out(len(completions))

    for fn, msg in ((Batched(lambda n: 1 / 0), "failed on the completions of f.jsonl:3 and others: ZeroDivisionError"),
                    (Batched(lambda n: [0.0] * (n + 1)), "returned 2 values for 1 completions"),
                    (Batched(lambda n: [float("inf")] * n), "returned inf on f.jsonl:3")):
        with pytest.raises(DataError, match=msg):
            R.score([R.Reward("boom", fn, 1.0)], [R.Scored("p", "c", info, "f.jsonl:3")])
    assert list(R.score([R.Reward("b", Batched(lambda n: [0.5] * n), 1.0)], items)["b"]) == [0.5, 0.5]


def _tiny(**overrides):
    return qwen_jax.Qwen3Config(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True),
                                   **overrides})


def _rules():
    return qwen_jax.ShardingRules(qwen_jax.make_mesh("data=1", devices=jax.devices()[:1]))


def test_engine_update_params_switches_weights_and_forgets_cached_prefixes():
    config, rules = _tiny(), _rules()
    a, b = (qwen_jax.init_params(config, jax.random.key(s)) for s in (0, 1))
    kw = dict(max_model_len=48, block_size=4, max_num_seqs=4, num_kv_blocks=64, dtype=jnp.float32)
    engine, fresh = Engine(config, a, None, rules, **kw), Engine(config, b, None, rules, **kw)
    prompt, sp = list(range(3, 19)), SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True,
                                                    logprobs=0)

    def run(e):
        out = e.add_request(prompt, sp).result(60)
        return out.token_ids, [next(iter(lp.values())) for lp in out.logprobs]

    try:
        first = run(engine)
        engine.update_params(b)
        hits = engine.stats()["prefix_cache_hits"]
        after = run(engine)
        assert engine.stats()["prefix_cache_hits"] == hits  # no K/V of the old weights is reused
        assert after == run(fresh) and after[1] != first[1]
    finally:
        engine.shutdown()
        fresh.shutdown()


def _moe(**overrides):
    return _tiny(**{**dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), **overrides})


def _rollout(config, dtype: str, replay: bool, prompts=3, max_new=12):
    """One rollout batch of `prompts` random prompts x 4 samples from a fresh model, log-probs from the
    engine -> (task, params, batch)."""
    rules = _rules()
    params = qwen_jax.init_params(config, jax.random.key(0))
    task = GRPOTask.of(config, dataclasses.replace(TC, seq_len=31, compute_dtype=dtype), rules, GRPOConfig(group_size=4))
    rng = np.random.default_rng(0)
    ps = [Prompt(f"p:{i}", "", tuple(int(t) for t in rng.integers(3, config.vocab_size, 5 + i)), {})
          for i in range(prompts)]
    rc = RolloutConfig(prompts_per_step=prompts, max_new_tokens=max_new, reuse_logprobs=True, block_size=4,
                       routing_replay=replay)
    source = RolloutSource(config, None, rules, ps, [R.Reward("even", R.even_tokens_reward, 1.0)], task, rc,
                           row_len=32, micro=4 * prompts, compute_dtype=dtype)
    try:
        return task, params, source.rollout(params, list(range(prompts)), seed=0, step=0)
    finally:
        source.close()


def _recorded(batch) -> np.ndarray:
    """[n, T] bool: the input positions the engine read (all of prompt and completion but the last token)."""
    n_read = batch["segment_ids"].sum(1) - 1
    return np.arange(batch["tokens"].shape[1] - 1)[None, :] < n_read[:, None]


def _own_routes(config, params, batch, dtype) -> np.ndarray:
    """[n, T, L_moe, k] the experts the trainer's forward picks by itself, each token's set sorted."""
    out = qwen_jax.forward(config, params, jnp.asarray(batch["tokens"][:, :-1]), dtype=jnp.dtype(dtype))
    return np.sort(np.moveaxis(np.asarray(out.routes), 0, 2), -1)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_engine_logprobs_equal_the_trainers(kind):
    """The contract: for the tokens the engine sampled, its float32 log-probs equal the trainer's recomputed
    ones within 1e-5, so --reuse-rollout-logprobs starts every step at ratio 1. For MoE the engine also
    records each token's experts (the 4 samples of a prompt share its prefill through the prefix cache):
    in float32 they are the trainer's own, and replaying them keeps the contract."""
    config = _moe() if kind == "moe" else _tiny()
    task, params, batch = _rollout(config, "float32", replay=kind == "moe")
    b = jax.tree.map(jnp.asarray, batch)
    ours = np.asarray(task.logprobs(params, b))
    m = batch["loss_mask"][:, 1:] == 1
    assert m.sum() > 100
    np.testing.assert_allclose(batch["old_logps"][m], ours[m], rtol=0, atol=1e-5)
    if kind == "moe":
        seen = _recorded(batch)
        assert np.array_equal(np.sort(batch["routes"], -1)[seen], _own_routes(config, params, batch, "float32")[seen])
        own = np.asarray(task.logprobs(params, {k: v for k, v in b.items() if k != "routes"}))
        np.testing.assert_allclose(own[m], ours[m], rtol=0, atol=1e-5)


def test_moe_routing_replay_in_bfloat16():
    """In bfloat16 the engine's and the trainer's forwards round differently, so without replay some
    tokens' experts flip (near-ties in the router), and the first-step ratio at those tokens strays from 1
    further. Replaying the engine's experts removes the flips: what is left is bfloat16 rounding."""
    config = _moe(vocab_size=256, hidden_size=128, head_dim=32, num_experts=64, num_experts_per_tok=8,
                  moe_intermediate_size=64)
    task, params, batch = _rollout(config, "bfloat16", replay=True, prompts=4, max_new=16)
    b = jax.tree.map(jnp.asarray, batch)
    seen = _recorded(batch)
    flipped = (np.sort(batch["routes"], -1) != _own_routes(config, params, batch, "bfloat16")).any(-1)  # [n, T, L]
    flipped_tokens = flipped.any(-1) & seen
    assert flipped_tokens.sum() >= 1
    old = batch["old_logps"]
    replay = np.abs(np.asarray(task.logprobs(params, b)) - old)  # |log ratio| at the first step
    own = np.abs(np.asarray(task.logprobs(params, {k: v for k, v in b.items() if k != "routes"})) - old)
    m = batch["loss_mask"][:, 1:] == 1
    assert replay[flipped_tokens].max() < own[flipped_tokens].max()
    assert replay[m].max() < own[m].max() and np.expm1(replay[m].max()) <= 4e-3, (replay[m].max(), own[m].max())


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_grpo_raises_a_reward_the_model_knows_nothing_of(tmp_path, kind):
    """The share of even token ids in a completion: about 0.5 for a fresh model. Full fine-tuning takes it
    above 0.75 in 30 steps (seed 0: 0.5 -> 0.85 on the training rollouts). LoRA (rank 8; it cannot touch the
    embeddings, norms or head that full fine-tuning moves most) raises it by more than 0.1 (seed 0: 0.50 ->
    0.64; the held-out mean of 512 tokens has a standard error of about 0.02). The old policy's log-probs come
    from the engine (the contract), so no second forward pass runs."""
    lora = LoraConfig(rank=8, alpha=16.0, targets=LoraConfig.parse_targets("all")) if kind == "lora" else None
    config, rules = (_tiny(hidden_size=128, intermediate_size=256, head_dim=32) if lora else _tiny()), _rules()
    rng = np.random.default_rng(0)
    prompts = [Prompt(f"p:{i}", "", tuple(int(t) for t in rng.integers(3, 64, 4)), {}) for i in range(48)]
    train, held = prompts[:40], prompts[40:]
    tc = dataclasses.replace(TC, steps=30, seq_len=11, batch_size=32, lr=3e-2 if lora else 1e-2, warmup_steps=0,
                             weight_decay=0.0, log_every=5, save_every=100)
    task = GRPOTask.of(config, tc, rules, GRPOConfig(group_size=8), lora)
    params = qwen_jax.init_params(config, jax.random.key(0))
    frozen = None
    if lora:
        frozen, params = {"base": params}, init_lora_params(config, lora, jax.random.key(1))
    source = RolloutSource(config, None, rules, train, [R.Reward("even", R.even_tokens_reward, 1.0)], task,
                           RolloutConfig(prompts_per_step=4, max_new_tokens=8, block_size=4, reuse_logprobs=True),
                           row_len=12, micro=32, frozen=frozen, lora=lora)

    def held_out(params):
        outs = source.generate(params, held, [source.sampling(0, None, i) for i in range(len(held))])
        return float(source.score(held, outs)[0].mean())

    try:
        before = held_out(params)
        result = fit(config, tc, params, source, None, str(tmp_path), rules, progress=False, task=task, frozen=frozen)
        after = held_out(result["state"]["params"])
    finally:
        source.close()
    assert 0.35 < before < 0.65, before
    assert (after > before + 0.1) if lora else (after > 0.75), (before, after)


def test_lora_rollouts_sample_the_adapted_model():
    """With LoRA the engine serves base + adapters: its log-probs equal the trainer's LoRA log-probs, and
    differ from the base model's. (The GRPO gradient itself is checked against PyTorch above, and LoRA
    gradients in test_lora.py.)"""
    from train.tasks import model_params

    config, rules = _tiny(), _rules()
    base = qwen_jax.init_params(config, jax.random.key(0))
    lora = LoraConfig(rank=4, alpha=8.0)
    adapters = init_lora_params(config, lora, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), adapters)
    frozen = {"base": base}
    task = GRPOTask.of(config, dataclasses.replace(TC, seq_len=11), rules, GRPOConfig(group_size=8), lora)
    rng = np.random.default_rng(0)
    prompts = [Prompt(f"p:{i}", "", tuple(int(t) for t in rng.integers(3, 64, 4)), {}) for i in range(4)]
    source = RolloutSource(config, None, rules, prompts, [R.Reward("even", R.even_tokens_reward, 1.0)], task,
                           RolloutConfig(prompts_per_step=4, max_new_tokens=8, block_size=4, reuse_logprobs=True),
                           row_len=12, micro=32, frozen=frozen, lora=lora)
    try:
        batch = source.rollout(adapters, [0, 1, 2, 3], seed=0, step=0)
    finally:
        source.close()
    rows = jax.tree.map(jnp.asarray, batch)
    m = batch["loss_mask"][:, 1:] == 1
    ours = np.asarray(task.logprobs(model_params(adapters, frozen, lora), rows))
    np.testing.assert_allclose(batch["old_logps"][m], ours[m], rtol=0, atol=1e-5)
    base_lp = np.asarray(GRPOTask.of(config, dataclasses.replace(TC, seq_len=11), rules, GRPOConfig(group_size=8))
                         .logprobs(base, rows))
    assert np.abs(base_lp[m] - batch["old_logps"][m]).max() > 0.1


def _cli(out, *extra):
    """train.grpo on the shipped model and demo prompts, with tiny rollouts."""
    return ["--steps", "4", "--max-new-tokens", "4", "--prompts-per-step", "2", "--group-size", "2",
            "--max-prompt-len", "96", "--eval-fraction", "0", "--lr", "1e-3", "--save-every", "2", "--no-progress",
            "--export-dtype", "float32", "--out", str(out), *extra]


def test_a_failing_reward_stops_with_one_line_naming_it_and_the_prompt(tmp_path, capfd, monkeypatch):
    from train import grpo

    (tmp_path / "my_rewards.py").write_text("def boom(p, c, i):\n    return 1 / 0\n\n\ndef nan(p, c, i):\n"
                                            "    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "ROMEO.\\n"}\n{"prompt": "JULIET.\\n"}\n')
    for fn, msg in (("boom", f"reward my_rewards:boom failed on {data}:1: ZeroDivisionError: division by zero"),
                    ("nan", f"reward my_rewards:nan returned nan on {data}:1; a reward must be a finite number")):
        rc = grpo.main(["--data", str(data), "--reward", f"my_rewards:{fn}", *_cli(tmp_path / fn, "--no-export")])
        out, err = capfd.readouterr()
        assert rc == 2 and "Traceback" not in out + err, err[-3000:]
        assert err.strip().splitlines()[-1] == f"error: {msg}"


def test_grpo_killed_and_resumed_equals_uninterrupted(tmp_path, shipped_reward_model):
    """SIGKILL after the first checkpoint, then --resume: the same rewards, losses and final weights, bit for
    bit (rollout seeds come from (seed, step, prompt); the engine forgets its prefix cache on every update).
    Two optimizer steps per rollout (--inner-steps 2) and a checkpoint every step, so the run is cut between
    two inner steps and resumes on the kept rollout batch. The rewards are the demo's plus a reward model at
    weight 0.5, logged on its own."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from qwen_jax.safetensors_io import SafetensorsFile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = repo
    rm = shipped_reward_model[0]
    cmd = [sys.executable, "-m", "train.grpo", "--reward", "train.demo.rewards:love_words", "--reward-model", f"{rm}=0.5",
           "--inner-steps", "2", "--save-every", "1"]
    ref = subprocess.run(cmd + _cli(tmp_path / "ref"), env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "cut"
    proc = subprocess.Popen(cmd + _cli(out), env=env, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "checkpoints").exists() and any(n.isdigit() for n in os.listdir(out / "checkpoints")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = subprocess.run(cmd + _cli(out, "--resume"), env=env, cwd=repo, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 0 < json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from"] < 4

    def curve(run):
        return [(r["step"], r["reward"], r["loss"]) for r in map(json.loads, open(run / "metrics.jsonl"))]

    assert curve(out) == curve(tmp_path / "ref") and len(curve(out)) == 4
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["inner_step"] for r in rows] == [0, 1, 0, 1]  # two rollouts, two steps each
    assert rows[0]["reward"] == rows[1]["reward"] and rows[0]["loss"] != rows[1]["loss"]
    key = f"reward/model:{os.path.normpath(rm)}"
    for r in map(json.loads, open(out / "metrics.jsonl")):  # the total is the weighted sum
        assert abs(r["reward"] - (0.5 * r[key] + r["reward/train.demo.rewards:love_words"])) <= 1e-6, r
        assert r[key + "_std"] > 0  # the reward model tells completions apart
        assert r["rollout_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0 and r["batch_tokens"] > 0
        assert {"kl", "clip_fraction", "entropy", "zero_advantage_groups", "completion_tokens", "rollout_s"} <= set(r)
    a, b = (SafetensorsFile(str(d / "hf" / "model.safetensors")) for d in (tmp_path / "ref", out))
    for k in a.keys():
        np.testing.assert_array_equal(np.asarray(a.get(k)), np.asarray(b.get(k)), err_msg=k)


def test_a_rollout_batch_is_kept_for_a_resume_between_inner_steps(tmp_path):
    """With --inner-steps 2, a run stopped after the first inner step resumes on the same batch and its
    metrics (from out/rollouts), then draws the next prompts; a batch that is gone is a one-line error."""
    config = _tiny()
    task = GRPOTask.of(config, TC, None, GRPOConfig(group_size=2))
    prompts = [Prompt(f"p:{i}", "", (3, 4, 5), {}) for i in range(4)]
    source = RolloutSource(config, None, None, prompts, [], task, RolloutConfig(prompts_per_step=2, inner_steps=2),
                           row_len=16, micro=4, out_dir=str(tmp_path))
    batch = {"tokens": np.arange(64, dtype=np.int32).reshape(4, 16), "advantages": np.ones(4, np.float32)}
    source.last_metrics = {"reward": 0.25}  # the rollout's metrics are kept with it
    source._save(7, batch)
    source.last_metrics = {}
    resumed = source.batches(4, 0, {"epoch": 0, "index": 1, "inner": 1, "rollout": 7}, current=lambda: None)
    got, state = next(resumed)
    assert state == {"epoch": 0, "index": 1, "inner": 0, "rollout": 7} and source.last_metrics["inner_step"] == 1
    assert source.last_metrics == {"reward": 0.25, "inner_step": 1}
    assert got.keys() == batch.keys() and all(np.array_equal(got[k], batch[k]) for k in batch)
    with pytest.raises(DataError, match="cannot resume between the inner steps of rollout 3: .*3.npz is missing"):
        next(source.batches(4, 0, {"epoch": 0, "index": 1, "inner": 1, "rollout": 3}, current=lambda: None))


def test_prompts_file_takes_raw_text_and_chat_messages(tmp_path):
    """{"prompt"} is used as is; {"messages"} goes through the checkpoint's chat template with its generation
    prompt and the thinking switch; other fields (and the messages) reach the rewards; a prompt longer than
    --max-prompt-len is skipped with its line number."""
    import json

    from qwen_jax.assets import DEFAULT_MODEL
    from train.rollout import read_prompts

    tok = qwen_jax.load_tokenizer(DEFAULT_MODEL)
    msgs = [{"role": "user", "content": "Speak, ROMEO."}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in ({"prompt": "JULIET.\n", "answer": 3},
                                                       {"messages": msgs, "answer": "4"},
                                                       {"prompt": "ROMEO. " * 200})) + "\n")
    got = {}
    for thinking in (True, False):
        prompts, bad, n = read_prompts(str(path), tok, 64, enable_thinking=thinking)
        assert n == 3 and [p.where for p in prompts] == [f"{path}:1", f"{path}:2"]
        assert [line for line, _ in bad.items] == [3] and "more than --max-prompt-len 64" in bad.items[0][1]
        raw, chat = prompts
        assert raw.text == "JULIET.\n" and raw.info == {"answer": 3} and list(raw.ids) == tok.encode("JULIET.\n")
        assert chat.text == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                    enable_thinking=thinking)
        assert chat.info == {"messages": msgs, "answer": "4"} and list(chat.ids) == tok.encode(chat.text)
        got[thinking] = chat.text
    assert got[True] != got[False]  # the switch reaches the template
