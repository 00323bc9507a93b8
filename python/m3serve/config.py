"""Typed settings of an M3 checkpoint, read from its config.json, with the checks the serving stack relies on.

Two forms are accepted:
  * the released vision-language form: model_type "minimax_m3_vl" with `text_config` and `vision_config`;
  * the text-only form: the text settings at the top level (architectures MiniMaxM3SparseForCausalLM or
    model_type minimax_m3 / minimax_m3_vl_text / minimax_m2; the text `model_type` varies between
    releases, so dispatch is on the presence of `text_config`, not on it).
Per-layer schedules come from `layer_types`/`mlp_layer_types` when present, else from the released
`sparse_attention_config.sparse_attention_freq` / `moe_layer_freq` lists, the way transformers derives them.
Every error names the field, the value found and the value expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KV_PAGE_SIZE = 128  # SGLang page size m3serve runs with; the MSA block must equal it
SPARSE_LAYER = "minimax_m3_sparse"
DENSE_LAYER = "full_attention"
KNOWN_ACTIVATIONS = ("swigluoai", "silu")  # transformers normalizes the checkpoint's "swigluoai" to "silu"

# Released-config names of the flattened index settings (transformers' own mapping, same names).
_SPARSE_KEYS = {
    "index_n_heads": "sparse_num_index_heads",
    "index_head_dim": "sparse_index_dim",
    "index_block_size": "sparse_block_size",
    "index_topk_blocks": "sparse_topk_blocks",
    "index_local_blocks": "sparse_local_block",
}


class M3ConfigError(ValueError):
    """A checkpoint's config or weights do not describe an M3 model m3serve can serve."""

    def __init__(self, where: str, field_name: str, found: Any, expected: str):
        self.field = field_name
        self.found = found
        self.expected = expected
        super().__init__(f"{where}: {field_name} is {found!r}, expected {expected}")


@dataclass(frozen=True)
class M3TextSettings:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float
    intermediate_size: int
    shared_intermediate_size: int
    dense_intermediate_size: int
    num_local_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    routed_scaling_factor: float
    hidden_act: str
    swiglu_alpha: float
    swiglu_limit: float
    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]
    index_n_heads: int
    index_head_dim: int
    index_block_size: int
    index_topk_blocks: int
    index_local_blocks: int
    bos_token_id: int | None
    eos_token_id: int | list[int] | None

    @property
    def sparse_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == SPARSE_LAYER]

    @property
    def dense_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == DENSE_LAYER]

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.mlp_layer_types) if t == "sparse"]


@dataclass(frozen=True)
class M3VisionSettings:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    num_channels: int = 3


@dataclass(frozen=True)
class M3Settings:
    text: M3TextSettings
    vision: M3VisionSettings | None
    image_token_id: int | None
    video_token_id: int | None
    projector_hidden_size: int | None
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None


def _require(where: str, cfg: dict, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in cfg:
        if default is ...:
            raise M3ConfigError(where, key, None, f"a {getattr(kind, '__name__', kind)} (the field is missing)")
        return default
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise M3ConfigError(where, key, value, f"a {name}")
    return value


def _rope(where: str, cfg: dict, head_dim: int) -> tuple[int, float]:
    """Rotary width and theta. transformers reads `rope_parameters.partial_rotary_factor`, SGLang reads
    `rotary_dim`: when both are present they must agree, or the two engines would rotate different widths."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    rotary_dim = cfg.get("rotary_dim")
    if rotary_dim is None and factor is None:
        rotary_dim = 64  # transformers' default for M3
    elif rotary_dim is None:
        rotary_dim = int(round(head_dim * float(factor)))
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim > head_dim or rotary_dim % 2:
        raise M3ConfigError(where, "rotary_dim", rotary_dim, f"an even integer in (0, head_dim={head_dim}]")
    if factor is not None and abs(float(factor) * head_dim - rotary_dim) > 1e-6:
        raise M3ConfigError(
            where, "rope_parameters.partial_rotary_factor", factor,
            f"rotary_dim / head_dim = {rotary_dim}/{head_dim} = {rotary_dim / head_dim}",
        )
    theta = rope.get("rope_theta", cfg.get("rope_theta", 5_000_000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise M3ConfigError(where, "rope_theta", theta, "a positive number")
    return rotary_dim, float(theta)


def _schedule(where: str, cfg: dict, key: str, legacy: list | None, values: dict[int, str], n: int) -> tuple[str, ...]:
    """A per-layer list, from `key` or from a released 0/1 frequency list."""
    if cfg.get(key) is not None:
        sched = cfg[key]
    elif legacy is not None:
        sched = [values[1] if f else values[0] for f in legacy]
    else:
        raise M3ConfigError(where, key, None, f"a list of {n} entries (or the released frequency list)")
    if not isinstance(sched, list) or len(sched) != n:
        found = len(sched) if isinstance(sched, list) else sched
        raise M3ConfigError(where, f"{key} (length)", found, f"num_hidden_layers = {n} entries")
    allowed = set(values.values())
    for i, entry in enumerate(sched):
        if entry not in allowed:
            raise M3ConfigError(where, f"{key}[{i}]", entry, f"one of {sorted(allowed)}")
    return tuple(sched)


def parse_text_settings(cfg: dict, where: str = "config.json") -> M3TextSettings:
    """Validate and type the text-model settings (a dict in config.json's text-config form)."""
    sparse_cfg = cfg.get("sparse_attention_config") or {}
    hidden = _require(where, cfg, "hidden_size", int)
    n_heads = _require(where, cfg, "num_attention_heads", int)
    n_kv = _require(where, cfg, "num_key_value_heads", int)
    head_dim = _require(where, cfg, "head_dim", int, hidden // max(n_heads, 1))
    n_layers = _require(where, cfg, "num_hidden_layers", int)
    for name, value in (("hidden_size", hidden), ("num_attention_heads", n_heads),
                        ("num_key_value_heads", n_kv), ("head_dim", head_dim), ("num_hidden_layers", n_layers)):
        if value <= 0:
            raise M3ConfigError(where, name, value, "a positive integer")
    if n_heads % n_kv:
        raise M3ConfigError(where, "num_key_value_heads", n_kv, f"a divisor of num_attention_heads = {n_heads}")

    index: dict[str, int] = {}
    for flat, legacy in _SPARSE_KEYS.items():
        value = cfg.get(flat, sparse_cfg.get(legacy))
        index[flat] = value
    defaults = {"index_n_heads": 4, "index_head_dim": 128, "index_block_size": 128,
                "index_topk_blocks": 16, "index_local_blocks": 1}
    for k, v in index.items():
        if v is None:
            index[k] = defaults[k]
        elif not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise M3ConfigError(where, k, v, "a positive integer")
    if index["index_block_size"] != KV_PAGE_SIZE:
        raise M3ConfigError(
            where, "index_block_size", index["index_block_size"],
            f"{KV_PAGE_SIZE} (the KV page size: MSA blocks are served as whole cache pages)",
        )
    if index["index_n_heads"] != n_kv:
        raise M3ConfigError(
            where, "index_n_heads", index["index_n_heads"],
            f"num_key_value_heads = {n_kv} (each index head selects blocks for one KV group)",
        )
    if index["index_local_blocks"] != 1:
        raise M3ConfigError(where, "index_local_blocks", index["index_local_blocks"], "1 (M3 keeps one local block)")
    if index["index_topk_blocks"] < 2:
        raise M3ConfigError(where, "index_topk_blocks", index["index_topk_blocks"], ">= 2 (local block + history)")

    layer_types = _schedule(where, cfg, "layer_types", sparse_cfg.get("sparse_attention_freq"),
                            {0: DENSE_LAYER, 1: SPARSE_LAYER}, n_layers)
    mlp_layer_types = _schedule(where, cfg, "mlp_layer_types", cfg.get("moe_layer_freq"),
                                {0: "dense", 1: "sparse"}, n_layers)
    rotary_dim, theta = _rope(where, cfg, head_dim)

    act = _require(where, cfg, "hidden_act", str, "swigluoai")
    if act not in KNOWN_ACTIVATIONS:
        raise M3ConfigError(where, "hidden_act", act, f"one of {KNOWN_ACTIVATIONS} (M3's SwiGLU-OAI)")
    alpha = _require(where, cfg, "swiglu_alpha", float, 1.702)
    limit = _require(where, cfg, "swiglu_limit", float, 7.0)
    if alpha <= 0:
        raise M3ConfigError(where, "swiglu_alpha", alpha, "a positive number (1.702 in M3)")
    if limit <= 0:
        raise M3ConfigError(where, "swiglu_limit", limit, "a positive number (7.0 in M3)")
    n_experts = _require(where, cfg, "num_local_experts", int, 128)
    top_k = _require(where, cfg, "num_experts_per_tok", int, 4)
    if not 0 < top_k <= n_experts:
        raise M3ConfigError(where, "num_experts_per_tok", top_k, f"in [1, num_local_experts = {n_experts}]")
    inter = _require(where, cfg, "intermediate_size", int)
    n_shared = _require(where, cfg, "n_shared_experts", int, 1)
    shared_inter = _require(where, cfg, "shared_intermediate_size", int, inter * n_shared)
    if shared_inter != inter * n_shared:
        # transformers sizes the shared expert by shared_intermediate_size, SGLang by
        # intermediate_size * n_shared_experts: they must agree or one engine mis-loads it.
        raise M3ConfigError(where, "shared_intermediate_size", shared_inter,
                            f"intermediate_size * n_shared_experts = {inter * n_shared}")
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise M3ConfigError(where, "scoring_func", cfg.get("scoring_func"), "'sigmoid'")

    return M3TextSettings(
        vocab_size=_require(where, cfg, "vocab_size", int),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        rope_theta=theta,
        max_position_embeddings=_require(where, cfg, "max_position_embeddings", int, 524288),
        rms_norm_eps=_require(where, cfg, "rms_norm_eps", float, 1e-6),
        intermediate_size=inter,
        shared_intermediate_size=shared_inter,
        dense_intermediate_size=_require(where, cfg, "dense_intermediate_size", int, 12288),
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        n_shared_experts=n_shared,
        routed_scaling_factor=_require(where, cfg, "routed_scaling_factor", float, 2.0),
        hidden_act=act,
        swiglu_alpha=alpha,
        swiglu_limit=limit,
        layer_types=layer_types,
        mlp_layer_types=mlp_layer_types,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        **index,
    )


def parse_vision_settings(cfg: dict, where: str) -> M3VisionSettings:
    settings = M3VisionSettings(
        hidden_size=_require(where, cfg, "hidden_size", int, 1280),
        intermediate_size=_require(where, cfg, "intermediate_size", int, 5120),
        num_hidden_layers=_require(where, cfg, "num_hidden_layers", int, 32),
        num_attention_heads=_require(where, cfg, "num_attention_heads", int, 16),
        patch_size=_require(where, cfg, "patch_size", int, 14),
        temporal_patch_size=_require(where, cfg, "temporal_patch_size", int, 2),
        spatial_merge_size=_require(where, cfg, "spatial_merge_size", int, 2),
        num_channels=_require(where, cfg, "num_channels", int, 3),
    )
    if settings.hidden_size % settings.num_attention_heads:
        raise M3ConfigError(where, "hidden_size", settings.hidden_size,
                            f"a multiple of num_attention_heads = {settings.num_attention_heads}")
    return settings


def parse_config(cfg: dict, where: str = "config.json") -> M3Settings:
    """Typed, validated settings from a config.json dict (either form)."""
    if not isinstance(cfg, dict):
        raise M3ConfigError(where, "(top level)", type(cfg).__name__, "a JSON object")
    if "text_config" in cfg:
        text_cfg = cfg["text_config"]
        if not isinstance(text_cfg, dict):
            raise M3ConfigError(where, "text_config", type(text_cfg).__name__, "a JSON object")
        text = parse_text_settings(text_cfg, f"{where} text_config")
        vision_cfg = cfg.get("vision_config")
        vision = parse_vision_settings(vision_cfg, f"{where} vision_config") if vision_cfg else None
        return M3Settings(
            text=text,
            vision=vision,
            image_token_id=cfg.get("image_token_index", cfg.get("image_token_id")),
            video_token_id=cfg.get("video_token_index", cfg.get("video_token_id")),
            projector_hidden_size=cfg.get("projector_hidden_size", text.hidden_size),
            raw=cfg,
        )
    archs = cfg.get("architectures") or []
    if not any("MiniMax" in a for a in archs) and not str(cfg.get("model_type", "")).startswith("minimax"):
        raise M3ConfigError(where, "architectures", archs, "a MiniMax-M3 architecture (e.g. MiniMaxM3SparseForCausalLM)")
    return M3Settings(text=parse_text_settings(cfg, where), vision=None, image_token_id=None,
                      video_token_id=None, projector_hidden_size=None, raw=cfg)


def load_m3_config(path: str | Path) -> M3Settings:
    """Read and validate `<path>/config.json` (or `path` itself when it is the file)."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.exists():
        raise M3ConfigError(str(p), "config.json", None, "an existing file (is this an M3 checkpoint directory?)")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise M3ConfigError(str(file), "(JSON)", f"invalid at line {e.lineno} column {e.colno}", "valid JSON") from e
    return parse_config(cfg, str(file))
