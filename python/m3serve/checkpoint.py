"""M3's checkpoint layout: the released tensor names and shapes, and a cheap check of a checkpoint's weights.

Names follow the released safetensors (the form transformers converts at load time and SGLang reads):
the text tower under `language_model.model.` (`model.` in the text-only form), MoE blocks as
`block_sparse_moe` with per-expert w1 (gate) / w3 (up) / w2 (down), the index branch as
`self_attn.index_{q,k}_{proj,norm}`, the vision tower under `vision_tower.vision_model.`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import SPARSE_LAYER, M3ConfigError, M3Settings, load_m3_config


def text_prefixes(settings: M3Settings) -> tuple[str, str]:
    """(prefix of the text model's tensors, name of the LM head) in this checkpoint form."""
    if settings.is_multimodal or "text_config" in settings.raw:
        return "language_model.model.", "language_model.lm_head.weight"
    return "model.", "lm_head.weight"


def expected_tensors(settings: M3Settings) -> dict[str, tuple[int, ...]]:
    """Every tensor an M3 checkpoint of these settings holds, with its shape."""
    t = settings.text
    prefix, head = text_prefixes(settings)
    h, hd = t.hidden_size, t.head_dim
    out: dict[str, tuple[int, ...]] = {
        f"{prefix}embed_tokens.weight": (t.vocab_size, h),
        f"{prefix}norm.weight": (h,),
        head: (t.vocab_size, h),
    }
    for i in range(t.num_hidden_layers):
        p = f"{prefix}layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (t.num_attention_heads * hd, h)
        out[p + "self_attn.k_proj.weight"] = (t.num_key_value_heads * hd, h)
        out[p + "self_attn.v_proj.weight"] = (t.num_key_value_heads * hd, h)
        out[p + "self_attn.o_proj.weight"] = (h, t.num_attention_heads * hd)
        out[p + "self_attn.q_norm.weight"] = (hd,)
        out[p + "self_attn.k_norm.weight"] = (hd,)
        if t.layer_types[i] == SPARSE_LAYER:
            out[p + "self_attn.index_q_proj.weight"] = (t.index_n_heads * t.index_head_dim, h)
            out[p + "self_attn.index_k_proj.weight"] = (t.index_head_dim, h)
            out[p + "self_attn.index_q_norm.weight"] = (t.index_head_dim,)
            out[p + "self_attn.index_k_norm.weight"] = (t.index_head_dim,)
        if t.mlp_layer_types[i] == "dense":
            out[p + "mlp.gate_proj.weight"] = (t.dense_intermediate_size, h)
            out[p + "mlp.up_proj.weight"] = (t.dense_intermediate_size, h)
            out[p + "mlp.down_proj.weight"] = (h, t.dense_intermediate_size)
        else:
            m = p + "block_sparse_moe."
            out[m + "gate.weight"] = (t.num_local_experts, h)
            out[m + "e_score_correction_bias"] = (t.num_local_experts,)
            for e in range(t.num_local_experts):
                out[m + f"experts.{e}.w1.weight"] = (t.intermediate_size, h)
                out[m + f"experts.{e}.w3.weight"] = (t.intermediate_size, h)
                out[m + f"experts.{e}.w2.weight"] = (h, t.intermediate_size)
            out[m + "shared_experts.gate_proj.weight"] = (t.shared_intermediate_size, h)
            out[m + "shared_experts.up_proj.weight"] = (t.shared_intermediate_size, h)
            out[m + "shared_experts.down_proj.weight"] = (h, t.shared_intermediate_size)
    if settings.vision is not None:
        v = settings.vision
        w = v.hidden_size
        vp = "vision_tower.vision_model."
        out[vp + "embeddings.patch_embedding.weight"] = (w, v.num_channels, v.temporal_patch_size,
                                                         v.patch_size, v.patch_size)
        out[vp + "pre_layrnorm.weight"] = (w,)  # sic: the released name
        out[vp + "pre_layrnorm.bias"] = (w,)
        for i in range(v.num_hidden_layers):
            lp = f"{vp}encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[lp + f"self_attn.{proj}.weight"] = (w, w)
                out[lp + f"self_attn.{proj}.bias"] = (w,)
            for norm in ("layer_norm1", "layer_norm2"):
                out[lp + f"{norm}.weight"] = (w,)
                out[lp + f"{norm}.bias"] = (w,)
            out[lp + "mlp.fc1.weight"] = (v.intermediate_size, w)
            out[lp + "mlp.fc1.bias"] = (v.intermediate_size,)
            out[lp + "mlp.fc2.weight"] = (w, v.intermediate_size)
            out[lp + "mlp.fc2.bias"] = (w,)
        proj = settings.projector_hidden_size or h
        merged = h * v.spatial_merge_size**2
        out["multi_modal_projector.linear_1.weight"] = (proj, w)
        out["multi_modal_projector.linear_1.bias"] = (proj,)
        out["multi_modal_projector.linear_2.weight"] = (h, proj)
        out["multi_modal_projector.linear_2.bias"] = (h,)
        out["patch_merge_mlp.linear_1.weight"] = (proj, merged)
        out["patch_merge_mlp.linear_1.bias"] = (proj,)
        out["patch_merge_mlp.linear_2.weight"] = (h, proj)
        out["patch_merge_mlp.linear_2.bias"] = (h,)
    return out


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from the safetensors index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = {name: path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise M3ConfigError(str(index), "weight_map", f.name, "a file that exists in the checkpoint")
        return files
    single = path / "model.safetensors"
    if not single.exists():
        raise M3ConfigError(str(path), "weights", None,
                            "model.safetensors or model.safetensors.index.json in the checkpoint directory")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def validate_checkpoint(path: str | Path, *, check_shapes: bool = True) -> M3Settings:
    """Check config.json and that every expected tensor exists with the expected shape (headers only)."""
    from safetensors import safe_open

    root = Path(path)
    settings = load_m3_config(root)
    files = _weight_files(root)
    expected = expected_tensors(settings)
    missing = [n for n in expected if n not in files]
    if missing:
        raise M3ConfigError(str(root), "weights", f"{len(missing)} missing tensors, e.g. {missing[0]}",
                            "every tensor the config implies")
    if check_shapes:
        by_file: dict[Path, list[str]] = {}
        for name in expected:
            by_file.setdefault(files[name], []).append(name)
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise M3ConfigError(f"{file.name}", name, list(shape), f"shape {list(expected[name])}")
    return settings
