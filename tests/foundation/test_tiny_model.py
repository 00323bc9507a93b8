"""`m3serve tiny-model`: deterministic, validated, and loadable by transformers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from m3serve.checkpoint import validate_checkpoint
from m3serve.config import M3ConfigError
from m3serve.tiny_model import write_tiny_model
from m3serve.tokenizer_files import SPECIAL_TOKENS, TEXT_MARKERS


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_checkpoint):
    a = write_tiny_model(tmp_path / "a", seed=0)
    b = write_tiny_model(tmp_path / "b", seed=1)
    assert _digest(a) == _digest(tiny_checkpoint)
    da, db = _digest(a), _digest(b)
    assert da["model.safetensors"] != db["model.safetensors"]
    assert da["tokenizer.json"] == db["tokenizer.json"]


def test_checkpoint_validates_and_names_bad_weights(tmp_path, tiny_checkpoint):
    settings = validate_checkpoint(tiny_checkpoint)
    assert settings.text.num_hidden_layers == 3
    ckpt = write_tiny_model(tmp_path / "c", seed=0)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    name = "language_model.model.layers.1.self_attn.index_k_proj.weight"
    tensors[name] = torch.zeros(3, 3, dtype=torch.bfloat16)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(M3ConfigError, match="index_k_proj.weight is \\[3, 3\\], expected shape"):
        validate_checkpoint(ckpt)
    del tensors[name]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(M3ConfigError, match="missing tensors"):
        validate_checkpoint(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(M3ConfigError, match="model.safetensors"):
        validate_checkpoint(ckpt)


def test_cli_writes_checkpoint_with_sizes(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "m3serve.cli", "tiny-model", "--out", str(out), "--seed", "3",
                        "--layers", "4", "--dense-layers", "2", "--experts", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())["text_config"]
    assert cfg["sparse_attention_config"]["sparse_attention_freq"] == [0, 0, 1, 1]
    assert cfg["num_local_experts"] == 8
    bad = subprocess.run([sys.executable, "-m", "m3serve.cli", "tiny-model", "--out", str(tmp_path / "x"),
                          "--heads", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "kv_heads" in bad.stderr


def test_tokenizer_has_m3_markers_and_template_renders(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    for text in [*SPECIAL_TOKENS.values(), *TEXT_MARKERS.values()]:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 1, f"{text!r} must be one token, got {ids}"
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS["image"]) == cfg["image_token_index"]
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS["eos"]) == cfg["text_config"]["eos_token_id"]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image"}]},
            {"role": "assistant", "content": "ok", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"a": 1, "b": "x"}}}]},
            {"role": "tool", "content": "done"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, thinking_mode="enabled")
    assert text.startswith(SPECIAL_TOKENS["bos"] + "]~b]system\n")
    assert "]~b]user\nsee]<]image[>[[e~[" in text
    assert ']<]minimax[>[<invoke name="f">' in text and "]<]minimax[>[<a>1]<]minimax[>[</a>" in text
    assert "<response>done</response>" in text
    assert text.endswith("]~b]ai\n<mm:think>\n")


def test_transformers_loads_and_generates(tiny_checkpoint):
    from transformers import AutoTokenizer
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
        MiniMaxM3SparseForConditionalGeneration,
    )

    model, info = MiniMaxM3SparseForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = torch.tensor([tok.encode("The agent reads the repository")])
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6)


def test_text_tower_loads_as_causal_lm(tiny_checkpoint):
    from m3serve.hf_compat import load_text_model

    model = load_text_model(tiny_checkpoint, dtype=torch.float32)
    assert type(model).__name__ == "MiniMaxM3VLForCausalLM"
    ids = torch.arange(5, 40)[None]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 39)
