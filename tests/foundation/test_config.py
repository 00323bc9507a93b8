"""m3serve.config: typed settings and the errors that name field, value and expectation."""

from __future__ import annotations

import copy
import json

import pytest

from m3serve.config import M3ConfigError, load_m3_config, parse_config


@pytest.fixture()
def raw(tiny_checkpoint) -> dict:
    return json.loads((tiny_checkpoint / "config.json").read_text())


def test_tiny_config_parses_into_typed_settings(tiny_checkpoint):
    s = load_m3_config(tiny_checkpoint)
    t = s.text
    assert s.is_multimodal and s.vision is not None
    assert t.index_block_size == 128 and t.index_topk_blocks == 16
    assert t.index_n_heads == t.num_key_value_heads
    assert t.dense_layer_ids == [0] and t.sparse_layer_ids == list(range(1, t.num_hidden_layers))
    assert t.moe_layer_ids == t.sparse_layer_ids
    assert t.rotary_dim == t.head_dim // 2
    assert s.image_token_id is not None and s.image_token_id < t.vocab_size


def test_text_only_form_and_released_frequency_lists(raw):
    text = copy.deepcopy(raw["text_config"])
    # The released form carries only the 0/1 frequency lists; the per-layer names are derived from them.
    del text["layer_types"], text["mlp_layer_types"]
    text["architectures"] = ["MiniMaxM3SparseForCausalLM"]
    s = parse_config(text)
    assert not s.is_multimodal
    freq = raw["text_config"]["sparse_attention_config"]["sparse_attention_freq"]
    assert s.text.sparse_layer_ids == [i for i, f in enumerate(freq) if f]


def test_real_m3_shapes_validate():
    """The released M3's published dimensions pass (3 dense + 57 sparse layers)."""
    freq = [0, 0, 0] + [1] * 57
    cfg = {
        "architectures": ["MiniMaxM3SparseForCausalLM"], "vocab_size": 200064, "hidden_size": 6144,
        "num_hidden_layers": 60, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
        "intermediate_size": 3072, "shared_intermediate_size": 3072, "dense_intermediate_size": 12288,
        "rotary_dim": 64, "partial_rotary_factor": 0.5, "hidden_act": "swigluoai", "moe_layer_freq": freq,
        "sparse_attention_config": {"sparse_num_index_heads": 4, "sparse_index_dim": 128, "sparse_block_size": 128,
                                    "sparse_topk_blocks": 16, "sparse_local_block": 1, "sparse_attention_freq": freq},
    }
    t = parse_config(cfg).text
    assert len(t.sparse_layer_ids) == 57 and t.dense_layer_ids == [0, 1, 2]


@pytest.mark.parametrize(
    ("path", "value", "field", "expected_words"),
    [
        (("index_block_size",), 64, "index_block_size", "128"),
        (("index_n_heads",), 3, "index_n_heads", "num_key_value_heads"),
        (("layer_types",), ["full_attention"], "layer_types (length)", "num_hidden_layers"),
        (("mlp_layer_types",), None, "mlp_layer_types", "list"),
        (("rotary_dim",), 4096, "rotary_dim", "head_dim"),
        (("hidden_act",), "gelu", "hidden_act", "swigluoai"),
        (("swiglu_limit",), -1.0, "swiglu_limit", "positive"),
        (("partial_rotary_factor",), 0.25, "rope_parameters.partial_rotary_factor", "rotary_dim"),
        (("shared_intermediate_size",), 7, "shared_intermediate_size", "n_shared_experts"),
        (("num_key_value_heads",), 3, "num_key_value_heads", "divisor"),
    ],
)
def test_bad_text_config_names_field_value_and_expectation(raw, path, value, field, expected_words):
    cfg = copy.deepcopy(raw)
    text = cfg["text_config"]
    if path == ("partial_rotary_factor",):
        text["rope_parameters"]["partial_rotary_factor"] = value
    elif path == ("mlp_layer_types",):
        text.pop("mlp_layer_types")
        text.pop("moe_layer_freq")
    else:
        text[path[0]] = value
        if path[0] == "layer_types":
            text.pop("sparse_attention_config")
    with pytest.raises(M3ConfigError) as err:
        parse_config(cfg)
    msg = str(err.value)
    assert err.value.field == field
    assert field in msg and expected_words in msg and "text_config" in msg


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(M3ConfigError, match="config.json"):
        load_m3_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(M3ConfigError, match="line 1"):
        load_m3_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(M3ConfigError, match="MiniMax-M3 architecture"):
        load_m3_config(tmp_path)
