"""HF checkpoint import/export: round trips through transformers, sharded files, and bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen_jax
from qwen_jax import CheckpointError, ConfigError
from qwen_jax.safetensors_io import SafetensorsFile, save_file
from reference.hf_models import build

SMALL = dict(num_hidden_layers=2)


def _hf_logits(path_or_model, ids):
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if isinstance(path_or_model, str):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=True),
    dict(tie_word_embeddings=False, attention_bias=True, head_dim=24),
    dict(num_experts=8, decoder_sparse_step=2, num_hidden_layers=3),
])
def test_round_trip_hf_ours_hf(tmp_path, overrides, rng):
    model, src = build(tmp_path / "src", **{**SMALL, **overrides})
    cfg, params = qwen_jax.load_pretrained(src, progress=False)
    qwen_jax.save_pretrained(tmp_path / "out", cfg, params, progress=False)
    ids = rng.integers(0, cfg.vocab_size, (2, 11))
    np.testing.assert_array_equal(_hf_logits(str(tmp_path / "out"), ids), _hf_logits(model, ids))
    # And back: our reload of the export is bit-identical to the first load.
    cfg2, params2 = qwen_jax.load_pretrained(tmp_path / "out", progress=False)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_files_load_and_export(tmp_path, rng):
    model, _ = build(tmp_path / "single", num_experts=4, **SMALL)
    model.save_pretrained(tmp_path / "multi", max_shard_size="40KB")
    shutil.copy(tmp_path / "single" / "config.json", tmp_path / "multi" / "config.json")
    assert os.path.exists(tmp_path / "multi" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "multi") if f.endswith(".safetensors")]) > 2
    cfg, params = qwen_jax.load_pretrained(tmp_path / "multi", progress=False)
    _, ref_params = qwen_jax.load_pretrained(tmp_path / "single", progress=False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Our sharded export: index + several files; transformers loads it with identical logits.
    qwen_jax.save_pretrained(tmp_path / "ours", cfg, params, max_shard_size="30KB", progress=False)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    ids = rng.integers(0, cfg.vocab_size, (1, 9))
    np.testing.assert_array_equal(_hf_logits(str(tmp_path / "ours"), ids), _hf_logits(model, ids))


def test_dtype_conversion_on_load_and_export(tmp_path):
    model, src = build(tmp_path / "src", dtype=torch.bfloat16, **SMALL)
    cfg, params = qwen_jax.load_pretrained(src, progress=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    cfg, p32 = qwen_jax.load_pretrained(src, dtype=jnp.float32, progress=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p32))
    qwen_jax.save_pretrained(tmp_path / "out", cfg, p32, dtype=jnp.bfloat16, progress=False)
    st = SafetensorsFile(str(tmp_path / "out" / "model.safetensors"))
    assert {st.dtype(k).name for k in st.keys()} == {"bfloat16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ref = SafetensorsFile(os.path.join(src, "model.safetensors"))
    for k in ref.keys():  # bf16 -> fp32 -> bf16 is exact
        np.testing.assert_array_equal(st.get(k), ref.get(k))


def test_load_directly_into_mesh(tmp_path):
    _, src = build(tmp_path, num_experts=8, num_attention_heads=8, num_key_value_heads=4, **SMALL)
    mesh = qwen_jax.make_mesh("data=2,tensor=4")
    cfg, sharded = qwen_jax.load_pretrained(src, mesh=mesh, progress=False)
    _, plain = qwen_jax.load_pretrained(src, progress=False)
    q = sharded["layers_0"]["attn"]["q"]  # [L, D, Hq, Hd]: heads over tensor=4
    assert q.sharding.spec[2] == "tensor" and len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (2, 64, 2, 16)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tokenizer_saved_with_export(tmp_path):
    from reference.hf_models import build_tokenizer, qwen3_chat_template

    _, src = build(tmp_path / "m", **SMALL)
    build_tokenizer(tmp_path / "m", qwen3_chat_template())
    tok = qwen_jax.load_tokenizer(tmp_path / "m")
    cfg, params = qwen_jax.load_pretrained(src, progress=False)
    qwen_jax.save_pretrained(tmp_path / "out", cfg, params, tokenizer=tok, progress=False)
    again = qwen_jax.load_tokenizer(tmp_path / "out")
    assert again.encode("Hello, world!") == tok.encode("Hello, world!")
    assert again.has_chat_template


# ---------------------------------------------------------------- bad input
@pytest.fixture
def ckpt(tmp_path):
    _, src = build(tmp_path / "ck", **SMALL)
    return src


def _rewrite(src, fn):
    """Rewrite model.safetensors through fn(dict of arrays) -> dict."""
    path = os.path.join(src, "model.safetensors")
    st = SafetensorsFile(path)
    tensors = fn({k: np.array(st.get(k)) for k in st.keys()})
    del st
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        qwen_jax.load_pretrained(ckpt, progress=False)


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt, lambda t: {**t, "model.layers.2.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"]})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        qwen_jax.load_pretrained(ckpt, progress=False)


def test_misshaped_tensor_from_config_mismatch(ckpt):
    cfg_path = os.path.join(ckpt, "config.json")
    cfg = json.loads(open(cfg_path).read())
    cfg["intermediate_size"] = 80
    open(cfg_path, "w").write(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \[64, 96\], "
                                              r"expected \[64, 80\]"):
        qwen_jax.load_pretrained(ckpt, progress=False)


def test_truncated_file(ckpt):
    path = os.path.join(ckpt, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated file: tensor"):
        qwen_jax.load_pretrained(ckpt, progress=False)
    open(path, "wb").write(data[:6])
    with pytest.raises(CheckpointError, match=r"truncated safetensors file"):
        qwen_jax.load_pretrained(ckpt, progress=False)


def test_missing_config_and_weights(tmp_path, ckpt):
    os.remove(os.path.join(ckpt, "config.json"))
    with pytest.raises(ConfigError, match=r"config.json: config file not found"):
        qwen_jax.load_pretrained(ckpt, progress=False)
    with pytest.raises(CheckpointError, match=r"checkpoint directory not found"):
        qwen_jax.load_pretrained(tmp_path / "nope", progress=False)
    d = tmp_path / "pickle_only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(qwen_jax.get_preset("qwen3-0.6b").to_hf_dict()))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match=r"only safetensors is supported, never pickle"):
        qwen_jax.load_pretrained(d, progress=False)


def test_index_names_missing_file(tmp_path):
    model, _ = build(tmp_path / "single", **SMALL)
    model.save_pretrained(tmp_path / "multi", max_shard_size="40KB")
    victim = sorted(f for f in os.listdir(tmp_path / "multi") if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / "multi" / victim)
    with pytest.raises(CheckpointError, match=f"{victim}: weight file listed in the index is missing"):
        qwen_jax.load_pretrained(tmp_path / "multi", progress=False)


def test_export_never_leaves_partial_files(tmp_path, ckpt):
    cfg, params = qwen_jax.load_pretrained(ckpt, progress=False)
    qwen_jax.save_pretrained(tmp_path / "out", cfg, params, progress=False)
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]
