"""Hand the fused ops to SGLang as the portable CUDA platform's forwards of its norm and rotary ops.

SGLang's fused ops (`sglang.kernels.fused_op.BaseFusedOp`) resolve, on an out-of-tree platform, to a
forward registered for the platform's dispatch key, else to their torch-native forward. The portable CUDA
platform answers `DISPATCH_KEY`; `register()` installs one forward per op class here. Each forward takes
the op as `self`, runs the Triton kernel when the call is one it covers, and otherwise (an option the
kernel does not implement, a CPU tensor) calls the op's own native forward, so every call still has an
answer. `M3SERVE_FUSED_OPS=0` registers nothing: SGLang's native forwards then run (the A/B switch).
"""

from __future__ import annotations

import os
from typing import Any

import torch

DISPATCH_KEY = "m3serve_cuda"
ENV = "M3SERVE_FUSED_OPS"
_registered: int | None = None


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _triton_can_run(*tensors: torch.Tensor | None) -> bool:
    # The interpreter (tests on CPU) runs the kernels on host tensors.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return all(t is None or t.is_cuda or interpreted for t in tensors)


_noted: set[str] = set()


def _note_first_use(kind: str) -> None:
    # Once per kind and process: these forwards run several times per layer, so the hot path pays a set lookup.
    if kind in _noted:
        return
    _noted.add(kind)
    from m3serve.plugin import marker

    marker.record(f"fused_{kind}", f"portable CUDA platform: {kind} runs as one Triton kernel")


def gemma_rms_norm_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                           post_residual_addition: torch.Tensor | None = None) -> Any:
    """`GemmaRMSNorm`'s forward: `x / rms(x) * (1 + w)`, after `x + residual` when given."""
    if not _triton_can_run(x, residual, post_residual_addition) or x.dtype != getattr(residual, "dtype", x.dtype):
        return self.forward_native(x, residual, post_residual_addition)
    from .norm import rms_norm

    if residual is not None and post_residual_addition is not None:
        residual = residual + post_residual_addition  # the native forward's order
    _note_first_use("norm")
    return rms_norm(x, self.weight, self.variance_epsilon, gemma=True, residual=residual)


def rms_norm_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                     post_residual_addition: torch.Tensor | None = None, quant_linear: Any = None) -> Any:
    """`RMSNorm`'s forward for its plain configuration; the options the kernel lacks go native."""
    plain = (
        quant_linear is None and post_residual_addition is None and self.variance_size_override is None
        and not self.fp32_residual and not self.cast_x_before_out_mul and self.override_orig_dtype is None
        and self.has_weight
    )
    if not plain or not _triton_can_run(x, residual) or x.dtype != getattr(residual, "dtype", x.dtype):
        return self.forward_native(x, residual, post_residual_addition, quant_linear)
    from .norm import rms_norm

    _note_first_use("norm")
    return rms_norm(x, self.weight, self.variance_epsilon, gemma=False, residual=residual)


def rotary_forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                   offsets: torch.Tensor | None = None, fused_set_kv_buffer_arg: Any = None) -> Any:
    """`RotaryEmbedding`'s forward: query and key rotated, one launch each."""
    if (fused_set_kv_buffer_arg is not None or hasattr(self, "sin_cos_cache")
            or not _triton_can_run(positions, query, key, self.cos_sin_cache)):
        return self.forward_native(positions, query, key, offsets, fused_set_kv_buffer_arg)
    from .rope import rotary

    if offsets is not None:
        positions = positions + offsets
    positions = positions.flatten()
    _note_first_use("rotary")
    cache = self.cos_sin_cache
    return (rotary(positions, query, cache, self.head_size, self.rotary_dim, self.is_neox_style),
            rotary(positions, key, cache, self.head_size, self.rotary_dim, self.is_neox_style))


def forwards() -> list[tuple[type, Any]]:
    """(SGLang op class, our forward) pairs. Registration is by exact class: subclasses (scaled rotary
    variants, other norms) keep their own dispatch."""
    from sglang.srt.layers.layernorm import GemmaRMSNorm, RMSNorm
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    return [(GemmaRMSNorm, gemma_rms_norm_forward), (RMSNorm, rms_norm_forward),
            (RotaryEmbedding, rotary_forward)]


def register() -> int:
    """Register our forwards under DISPATCH_KEY (inert on any platform that does not answer that key);
    returns how many were registered."""
    if not enabled():
        return 0
    from sglang.kernels.fused_op import BaseFusedOp

    pairs = forwards()
    for op_cls, fn in pairs:
        BaseFusedOp.register_oot_forward(op_cls, fn, DISPATCH_KEY)
    return len(pairs)


def register_once() -> int:
    """`register()` the first time it is called in this process; afterwards what that call returned."""
    global _registered
    if _registered is None:
        _registered = register()
        from m3serve.plugin import marker

        marker.note("fused_ops_registered", _registered)
    return _registered
