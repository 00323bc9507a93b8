"""Write the scaled model "m3-slice" (research/perf_anchors.md section 4.1) as config + tokenizer only.

Weights cannot travel to the GPU machine (about 16 GB), so SGLang initialises them itself with
`--load-format dummy`. The checkpoint directory holds what m3serve's tiny writer holds minus
model.safetensors: config.json (M3's released vision-language form), tokenizer, chat template,
generation and image-processor configs.

Shapes: M3's exact attention and index geometry (hidden 6144, 64 q / 4 kv heads, head_dim 128, rotary 64,
4 index heads x 128, block 128, top-16, local 1, max scoring), layer 0 dense attention + dense MLP
12288, layers 1-7 MSA + MoE (16 experts x 3072, top-4, one shared 3072 expert), the tiny byte-level BPE
vocabulary (the client counts tokens with this tokenizer, so prompts are exact).

`variant="dense"` keeps every weight shape but marks all layers dense-attention
(sparse_attention_freq all 0): the dense-attention arm of the benchmark.

    python benchmarks/agentic/gpu/slice_model.py --out DIR [--variant sparse|dense] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

# M3's attention/index shapes with fewer layers and experts (perf_anchors 4.1). The vocabulary is the tiny
# tokenizer's: as small as it allows, so the embedding and lm_head cost nothing.
SLICE_SIZES: dict[str, int] = {
    "layers": 8,
    "dense_layers": 1,
    "hidden": 6144,
    "heads": 64,
    "kv_heads": 4,
    "head_dim": 128,
    "index_dim": 128,
    "experts": 16,
    "experts_per_tok": 4,
    "expert_width": 3072,
    "dense_width": 12288,
    "vocab": 1024,
    "max_position_embeddings": 262_144,
}
# The same structure at CPU size (for the dry run of the whole pipeline on the CPU machine).
TINY_SIZES: dict[str, int] = {"layers": 3, "dense_layers": 1, "vocab": 1024, "max_position_embeddings": 262_144}
VARIANTS = ("sparse", "dense")


def slice_config(sizes: dict[str, int], variant: str = "sparse") -> tuple[dict, object, dict[str, int]]:
    """(config.json dict, tokenizer, special-token ids) for `sizes` and `variant`; checked by m3serve's loader."""
    from m3serve.config import DENSE_LAYER, parse_config
    from m3serve.tiny_model import TinySizes, build_config
    from m3serve.tokenizer_files import build_tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    tiny = TinySizes(**sizes)
    tiny.validate()
    tokenizer, token_ids = build_tokenizer(tiny.vocab)
    vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64
    config = build_config(tiny, token_ids, vocab_size)
    if variant == "dense":
        text = config["text_config"]
        n = text["num_hidden_layers"]
        sparse = text["sparse_attention_config"]
        sparse["sparse_attention_freq"] = [0] * n
        sparse["sparse_disable_index_value"] = [0] * n
        text["layer_types"] = [DENSE_LAYER] * n  # the MLP schedule (dense MLP on layer 0, MoE after) is kept
    parse_config(config, f"m3-slice ({variant}) config")
    return config, tokenizer, token_ids


def write_slice_model(out_dir: str | Path, variant: str = "sparse", sizes: dict[str, int] | None = None) -> Path:
    """Write config + tokenizer files (no weights) of the scaled model into `out_dir`; return it."""
    from m3serve.tiny_model import write_model_files

    sizes = dict(SLICE_SIZES if sizes is None else sizes)
    config, tokenizer, token_ids = slice_config(sizes, variant)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_model_files(out, config, tokenizer, token_ids)
    (out / "m3serve_slice.json").write_text(json.dumps(
        {"model": "m3-slice", "variant": variant, "weights": "none (serve with --load-format dummy)",
         "sizes": sizes, "param_estimate": param_estimate(sizes)}, indent=2) + "\n")
    return out


def param_estimate(sizes: dict[str, int]) -> int:
    """Rough text-model parameter count (attention + index + MLP/MoE + embeddings), for the memory plan."""
    from m3serve.tiny_model import TinySizes

    s = asdict(TinySizes(**sizes))
    h, d = s["hidden"], s["head_dim"]
    attn = h * (s["heads"] * d) * 2 + h * (s["kv_heads"] * d) * 2
    index = h * (s["kv_heads"] * s["index_dim"]) + h * s["index_dim"]
    moe = (s["experts"] + 1) * 3 * h * s["expert_width"] + h * s["experts"]
    dense_mlp = 3 * h * s["dense_width"]
    sparse_layers = s["layers"] - s["dense_layers"]
    return (s["layers"] * attn + sparse_layers * (index + moe) + s["dense_layers"] * dense_mlp
            + 2 * s["vocab"] * h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--variant", choices=VARIANTS, default="sparse")
    p.add_argument("--tiny", action="store_true", help="CPU-sized model of the same structure (dry runs)")
    args = p.parse_args(argv)
    path = write_slice_model(args.out, args.variant, TINY_SIZES if args.tiny else SLICE_SIZES)
    print(f"wrote m3-slice ({args.variant}{', tiny' if args.tiny else ''}) config + tokenizer to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
