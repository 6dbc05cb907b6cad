"""The small checkpoint shipped with the project (the default `python -m train.pretrain` run)."""

import jax
import jax.numpy as jnp
import torch

import qwen_jax
from conftest import rel_err
from qwen_jax.assets import DEFAULT_MODEL
from train import data as D
from train.config import TrainConfig
from train.trainer import evaluate, make_eval_step
from qwen_jax.sharding import ShardingRules, make_mesh


def test_loads_in_transformers_with_matching_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, params = qwen_jax.load_pretrained(DEFAULT_MODEL, progress=False)
    tok = qwen_jax.load_tokenizer(DEFAULT_MODEL)
    hf_tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    text = "ROMEO.\nBut soft, what light through yonder window breaks?"
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    ours = qwen_jax.forward(cfg, params, jnp.asarray([ids], jnp.int32)).logits
    assert rel_err(ours, ref) <= 1e-4


def test_held_out_loss_is_well_below_unigram_entropy():
    cfg, params = qwen_jax.load_pretrained(DEFAULT_MODEL, dtype=jnp.float32, progress=False)
    tok = qwen_jax.load_tokenizer(DEFAULT_MODEL)
    train_ds, eval_ds = D.build_datasets(tok, D.DEFAULT_CORPUS, seq_len=256, eval_fraction=0.02, seed=0,
                                         eos_id=cfg.eos_token_id)
    entropy = D.unigram_entropy(train_ds, cfg.vocab_size)
    rules = ShardingRules(make_mesh("data=1", devices=jax.devices()[:1]))
    tc = TrainConfig(seq_len=256, compute_dtype="float32")
    loss = evaluate(make_eval_step(cfg, tc, rules), params, eval_ds, 8, 4, rules)["eval_loss"]
    assert entropy > 6.5
    assert loss < entropy - 1.0, (loss, entropy)
