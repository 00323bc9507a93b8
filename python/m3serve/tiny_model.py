"""`m3serve tiny-model`: write a tiny random MiniMax-M3 checkpoint in the released Hugging Face layout.

It is the embedded default of `m3serve serve` and the fixture of every test: config.json (the released
vision-language form, with the sparse-attention and MoE schedules), safetensors weights under M3's real
tensor names (m3serve.checkpoint), a byte-level BPE tokenizer with M3's special tokens, M3's chat template
and the image-processor config. Deterministic for a seed: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .chat_template import CHAT_TEMPLATE
from .checkpoint import expected_tensors
from .config import DENSE_LAYER, SPARSE_LAYER, parse_config
from .tokenizer_files import SPECIAL_TOKENS, build_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny model. The attention geometry keeps M3's ratios where it matters (GQA, partial
    RoPE, one shared index-K head, 128-token blocks, top-16) at widths a 2-core CPU serves quickly."""

    layers: int = 3  # layer 0 dense attention + dense MLP; the rest MSA sparse attention + MoE
    dense_layers: int = 1
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2  # == index heads
    head_dim: int = 32
    index_dim: int = 32
    experts: int = 4
    experts_per_tok: int = 2
    expert_width: int = 64
    dense_width: int = 256
    vision_layers: int = 2
    vision_hidden: int = 64
    vision_heads: int = 4
    vision_width: int = 128
    vocab: int = 1024
    max_position_embeddings: int = 1_048_576

    def validate(self) -> None:
        if not 0 <= self.dense_layers <= self.layers:
            raise ValueError(f"dense_layers must be in [0, layers={self.layers}], got {self.dense_layers}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 4 or self.index_dim % 4:
            raise ValueError("head_dim and index_dim must be multiples of 4 (partial RoPE rotates half)")
        if self.vocab < len(SPECIAL_TOKENS) + 300:
            raise ValueError(f"vocab must be at least {len(SPECIAL_TOKENS) + 300} (bytes + merges + specials)")


def build_config(sizes: TinySizes, token_ids: dict[str, int], vocab_size: int) -> dict:
    """config.json in the released vision-language form."""
    n = sizes.layers
    sparse_freq = [0] * sizes.dense_layers + [1] * (n - sizes.dense_layers)
    rotary_dim = sizes.head_dim // 2
    text = {
        "model_type": "minimax_m3_vl_text",
        "architectures": ["MiniMaxM3SparseForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": sizes.hidden,
        "intermediate_size": sizes.expert_width,
        "shared_intermediate_size": sizes.expert_width,
        "dense_intermediate_size": sizes.dense_width,
        "num_hidden_layers": n,
        "num_attention_heads": sizes.heads,
        "num_key_value_heads": sizes.kv_heads,
        "head_dim": sizes.head_dim,
        "hidden_act": "swigluoai",
        "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0,
        "max_position_embeddings": sizes.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "bos_token_id": token_ids["bos"],
        "eos_token_id": token_ids["eos"],
        "tie_word_embeddings": False,
        "num_local_experts": sizes.experts,
        "num_experts_per_tok": sizes.experts_per_tok,
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.0,
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "use_gemma_norm": True,
        "use_qk_norm": True,
        "qk_norm_type": "per_head",
        "rotary_dim": rotary_dim,
        "partial_rotary_factor": rotary_dim / sizes.head_dim,
        "rope_theta": 5_000_000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                            "partial_rotary_factor": rotary_dim / sizes.head_dim},
        "moe_layer_freq": sparse_freq,
        "layer_types": [SPARSE_LAYER if f else DENSE_LAYER for f in sparse_freq],
        "mlp_layer_types": ["sparse" if f else "dense" for f in sparse_freq],
        "index_n_heads": sizes.kv_heads,
        "index_head_dim": sizes.index_dim,
        "index_block_size": 128,
        "index_topk_blocks": 16,
        "index_local_blocks": 1,
        "sparse_attention_config": {
            "use_sparse_attention": True,
            "sparse_num_index_heads": sizes.kv_heads,
            "sparse_index_dim": sizes.index_dim,
            "sparse_block_size": 128,
            "sparse_topk_blocks": 16,
            "sparse_local_block": 1,
            "sparse_init_block": 0,
            "sparse_score_type": "max",
            "sparse_attention_freq": sparse_freq,
            "sparse_disable_index_value": sparse_freq,
        },
    }
    vision = {
        "model_type": "minimax_m3_vl_vision",
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": sizes.vision_width,
        "num_hidden_layers": sizes.vision_layers,
        "num_attention_heads": sizes.vision_heads,
        "num_channels": 3,
        "image_size": 2016,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        # Fields SGLang's M3 vision tower requires (sglang/srt/models/minimax_vl_common.py CLIPVisionConfig).
        "img_token_compression_config": {"temporal_patch_size": 2, "spatial_merge_size": 2},
        "position_embedding_type": "rope",
        "rope_mode": "3d",
        "rope_theta": 10000.0,
        "vision_segment_max_frames": 4,
    }
    return {
        "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
        "model_type": "minimax_m3_vl",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "image_token_index": token_ids["image"],
        "video_token_index": token_ids["video"],
        "projector_hidden_size": sizes.hidden,
        "bos_token_id": token_ids["bos"],
        "eos_token_id": token_ids["eos"],
        "text_config": text,
        "vision_config": vision,
    }


def _init_tensor(name: str, shape: tuple[int, ...], gen):
    """Random values whose scale keeps activations O(1) through the tiny net, so logits are spread out
    (near-uniform logits would make greedy parity tests flaky on ties)."""
    import torch

    if name.endswith("norm.weight") or "layer_norm" in name or "pre_layrnorm" in name:
        # Gemma-style text norms store w with output x*(1+w); LayerNorm weights are used as-is.
        base = 1.0 if ("layer_norm" in name or "pre_layrnorm" in name) else 0.0
        if name.endswith(".bias"):
            base = 0.0
        return base + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    gain = 4.0 if "lm_head" in name else 1.0
    return gain * torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def write_tiny_model(out_dir: str | Path, seed: int = 0, **sizes) -> Path:
    """Write the tiny checkpoint into `out_dir` (created if needed) and return its path."""
    import torch
    from safetensors.torch import save_file

    tiny = TinySizes(**sizes)
    tiny.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer, token_ids = build_tokenizer(tiny.vocab)
    vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64  # pad the embedding like real checkpoints do
    config = build_config(tiny, token_ids, vocab_size)
    settings = parse_config(config, "tiny config")  # the writer obeys the same checks as the loader

    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: _init_tensor(name, shape, gen).to(torch.bfloat16).contiguous()
        for name, shape in sorted(expected_tensors(settings).items())
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    write_model_files(out, config, tokenizer, token_ids)
    (out / "m3serve_tiny.json").write_text(json.dumps({"seed": seed, "sizes": asdict(tiny)}, indent=2) + "\n")
    return out


def write_model_files(out: Path, config: dict, tokenizer, token_ids: dict[str, int]) -> None:
    """Everything of a checkpoint but its weights: config, generation config, tokenizer, chat template,
    image-processor config. Shared by the tiny model and the GPU benchmark's weightless scaled model."""
    max_len = config["text_config"]["max_position_embeddings"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": token_ids["bos"], "eos_token_id": token_ids["eos"], "do_sample": False}, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS["bos"],
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["pad"],
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MiniMaxM3VLImageProcessor",
        "processor_class": "MiniMaxM3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "min_pixels": 3136,
        "max_pixels": 451584,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }, indent=2) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="m3serve tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0)
    defaults = TinySizes()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value, dest=name,
                            help=f"default {value}")
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in vars(args).items() if k not in ("out", "seed")}
    try:
        path = write_tiny_model(args.out, seed=args.seed, **sizes)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote tiny M3 checkpoint to {path}")
    return 0
