"""transformers' MiniMax-M3 as the reference model: load a checkpoint's text tower as MiniMaxM3VLForCausalLM.

Released M3 checkpoints are vision-language checkpoints; transformers converts their tensor names when it
loads the full model (MiniMaxM3SparseForConditionalGeneration). Parity tests compare text generation, so
this takes the converted text tower and LM head into the text-only class.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_text_model(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """MiniMaxM3VLForCausalLM with the checkpoint's text weights, in eval mode."""
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
        MiniMaxM3SparseForConditionalGeneration,
        MiniMaxM3VLForCausalLM,
    )

    full = MiniMaxM3SparseForConditionalGeneration.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation
    )
    text_config = full.config.text_config
    text_config._attn_implementation = attn_implementation
    # The per-expert loop: exact in any dtype (the grouped-GEMM path has no float64 kernel).
    text_config._experts_implementation = "eager"
    model = MiniMaxM3VLForCausalLM(text_config).to(dtype)
    state = {f"model.{k}": v for k, v in full.model.language_model.state_dict().items()}
    state["lm_head.weight"] = full.lm_head.weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"text tower did not map cleanly: missing={missing[:5]} unexpected={unexpected[:5]}")
    return model.eval()
