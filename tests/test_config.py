import json

import pytest

from qwen_jax import ConfigError, Qwen3Config, get_preset
from qwen_jax.config import PRESETS


def _hf_dense(**kw):
    d = dict(model_type="qwen3", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=5000.0, max_position_embeddings=256)
    d.update(kw)
    return d


def test_both_rope_spellings_agree():
    old = Qwen3Config.from_hf_dict(_hf_dense(rope_scaling={"type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 64}))
    new = Qwen3Config.from_hf_dict(_hf_dense(rope_theta=None, rope_parameters={
        "rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "original_max_position_embeddings": 64}))
    assert old == new
    assert old.rope == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert old.rope_theta == 5000.0 and old.head_dim == 24


def test_yarn_defaults_original_length_like_hf():
    c = Qwen3Config.from_hf_dict(_hf_dense(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    assert c.rope["original_max_position_embeddings"] == 256


def test_both_expert_spellings_agree():
    base = _hf_dense(model_type="qwen3_moe", num_experts_per_tok=2, moe_intermediate_size=16)
    a = Qwen3Config.from_hf_dict({**base, "num_experts": 8})
    b = Qwen3Config.from_hf_dict({**base, "num_local_experts": 8})
    assert a == b and a.num_experts == 8 and a.is_moe


def test_round_trip_through_hf_dict_and_transformers():
    from transformers import AutoConfig

    for name in ("qwen3-0.6b", "qwen3-30b-a3b"):
        c = get_preset(name).replace(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32768})
        d = c.to_hf_dict()
        assert Qwen3Config.from_hf_dict(json.loads(json.dumps(d))) == c
        hf = AutoConfig.for_model(**d)  # transformers reads the exported spelling
        assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
        assert Qwen3Config.from_hf_dict(hf.to_dict()) == c


# Model-card figures: non-embedding parameters for dense models, total / activated for MoE.
@pytest.mark.parametrize("name,non_embedding", [
    ("qwen3-0.6b", 0.44e9), ("qwen3-1.7b", 1.4e9), ("qwen3-4b", 3.6e9), ("qwen3-8b", 6.95e9),
    ("qwen3-14b", 13.2e9), ("qwen3-32b", 31.2e9),
])
def test_dense_presets_match_model_cards(name, non_embedding):
    c = PRESETS[name]
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    assert abs(c.num_params() - embeddings - non_embedding) / non_embedding < 0.015


@pytest.mark.parametrize("name,total,active", [("qwen3-30b-a3b", 30.5e9, 3.3e9), ("qwen3-235b-a22b", 235e9, 22e9)])
def test_moe_presets_match_model_cards(name, total, active):
    c = PRESETS[name]
    assert abs(c.num_params() - total) / total < 0.01
    assert abs(c.num_params(active=True) - active) / active < 0.02


def test_layer_groups():
    c = Qwen3Config.from_hf_dict(_hf_dense(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=8, num_hidden_layers=5, decoder_sparse_step=2,
                                           mlp_only_layers=[3]))
    assert c.layer_groups == ((False, 0, 1), (True, 1, 2), (False, 2, 5))


@pytest.mark.parametrize("change,message", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "divisible by num_key_value_heads"),
    (dict(num_attention_heads=0), "positive"),
    (dict(model_type="llama"), "unsupported model_type 'llama'"),
    (dict(rope_scaling={"type": "longrope", "factor": 2.0}), "unsupported rope type 'longrope'"),
    (dict(rope_scaling={"type": "linear"}), "needs factor"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "fator": 1}), "unknown rope scaling keys"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(head_dim=15), "even"),
    (dict(vocab_size="big"), "vocab_size"),
])
def test_validation_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        Qwen3Config.from_hf_dict(_hf_dense(**change), source="cfg.json")


def test_moe_validation():
    base = _hf_dense(model_type="qwen3_moe", moe_intermediate_size=16)
    with pytest.raises(ConfigError, match="num_experts"):
        Qwen3Config.from_hf_dict({**base, "num_experts_per_tok": 2})
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(9\)"):
        Qwen3Config.from_hf_dict({**base, "num_experts": 8, "num_experts_per_tok": 9})
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        Qwen3Config.from_hf_dict({**base, "num_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": [7]})


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        Qwen3Config.from_json_file(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3",')
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3Config.from_json_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 8}))
    with pytest.raises(ConfigError, match=r"config.json: missing required key 'num_attention_heads'"):
        Qwen3Config.from_json_file(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("qwen3-7b")
    assert get_preset("Qwen/Qwen3-8B") is PRESETS["qwen3-8b"]
