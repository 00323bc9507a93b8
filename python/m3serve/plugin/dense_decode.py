"""M3's dense (full-attention) layers in decode on msa_kernels' shared-prefix kernel instead of SGLang's.

Why: agentic sessions share a long cached prefix, and SGLang's Triton decode kernel reads every request's K/V
on its own: at batch 8 on a 60k prefix one dense layer reads the prefix 8 times, ~1 GB a step, 0.7 ms of a 6 ms
decode step on an H200 (`benchmarks/results/served_step_split_h200_r14_fused_on.md`). The radix cache hands a
shared prefix to every request as the very same cache slots; `msa_kernels.triton.dense_decode` finds those
chunks on the device and reads each once for all the requests that share it.

Seam: an AFTER hook on `TritonAttnBackend.__init__` replaces the instance's `decode_attention_fwd` (the one
function through which its `forward_decode` runs the decode kernel, after SGLang has stored the new token's
K/V and built `kv_indptr`/`kv_indices`) with `SharedPrefixDecode`, which serves the calls it covers and hands
every other call to SGLang's function unchanged: MLA, logit caps, sinks, score mods, temperature scaling, fp8
caches or scales, head layouts the kernel lacks, CPU tensors (unless the Triton interpreter runs: tests).
M3SERVE_DENSE_DECODE=triton keeps SGLang's kernel everywhere (benchmarks: the old path).

The kernel's grid depends on the batch size and the server's context length only (`max_context_len`), so the
call captures into SGLang's decode CUDA graphs like the kernel it replaces.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from . import marker

TARGET = "sglang.srt.layers.attention.triton_backend.TritonAttnBackend.__init__"
SWITCH_ENV = "M3SERVE_DENSE_DECODE"  # "shared" (default) or "triton" (SGLang's kernel, for comparisons)
_DTYPES = (torch.float16, torch.bfloat16)
# Positional order of decode_attention_fwd's arguments (sglang 0.5.23, sglang.kernels.ops.attention).
_ARGS = ("q", "k_buffer", "v_buffer", "o", "kv_indptr", "kv_indices", "attn_logits", "attn_lse", "num_kv_splits",
         "max_kv_splits", "sm_scale", "k_scale", "v_scale", "logit_cap", "sinks", "xai_temperature_len", "has_mla",
         "use_pdl", "page_size", "score_mod", "aux_tensors")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def reason_not_served(call: dict[str, Any]) -> str | None:
    """Why the shared-prefix kernel does not serve this decode call (None: it does)."""
    q, k, v, o = call["q"], call["k_buffer"], call["v_buffer"], call["o"]
    if call.get("has_mla") or call.get("logit_cap") or call.get("sinks") is not None:
        return "MLA, logit cap or sinks"
    if call.get("score_mod") is not None or call.get("aux_tensors") is not None:
        return "score_mod"
    if (call.get("xai_temperature_len") or -1) > 0:
        return "temperature scaling"
    if float(call.get("k_scale", 1.0)) != 1.0 or float(call.get("v_scale", 1.0)) != 1.0:
        return "scaled (fp8) cache"
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return "not a CUDA tensor"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype or o.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}, o {o.dtype}"
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[-1] != q.shape[-1] or o.shape != q.shape:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, o {tuple(o.shape)}"
    group, rem = divmod(q.shape[1], k.shape[1])
    if rem or not _pow2(group) or group > 128 or not _pow2(q.shape[-1]) or q.shape[-1] < 16:
        return f"{q.shape[1]} query heads over {k.shape[1]} KV heads of dim {q.shape[-1]}"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or o.stride(-1) != 1:
        return "non-contiguous head dim"
    return None


class SharedPrefixDecode:
    """Stands in for a TritonAttnBackend's `decode_attention_fwd`; same signature."""

    def __init__(self, original: Callable[..., Any], max_len: int):
        self.original = original
        self.max_len = max_len

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = dict(zip(_ARGS, args))
        call.update(kwargs)
        if reason_not_served(call) is not None:
            return self.original(*args, **kwargs)
        from msa_kernels.triton.dense_decode import dense_decode

        # Counted per Python call (eager steps and graph captures; a replay runs no Python): proof for tests
        # and benchmarks that the served path ran.
        marker.record("dense_decode_shared", "M3 dense-layer decode ran the shared-prefix kernel (msa_kernels)")
        dense_decode(call["q"], call["k_buffer"], call["v_buffer"], call["kv_indptr"], call["kv_indices"],
                     float(call["sm_scale"]), self.max_len, out=call["o"])
        return None


WRAPPER_ATTR = "_m3serve_shared_decode"  # the SharedPrefixDecode a backend runs (tests, and installing once)


def install_shared_decode(result: Any, backend: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook on TritonAttnBackend.__init__: route its decode kernel through SharedPrefixDecode."""
    if os.environ.get(SWITCH_ENV, "shared") == "triton":
        return
    original = getattr(backend, "decode_attention_fwd", None)
    max_len = getattr(backend, "max_context_len", None)
    if original is None or not max_len or getattr(backend, WRAPPER_ATTR, None) is not None:
        return
    wrapper = SharedPrefixDecode(original, int(max_len))
    setattr(backend, WRAPPER_ATTR, wrapper)
    # Kept out of torch.compile's tracing (--enable-torch-compile), as SGLang keeps the function it replaces.
    backend.decode_attention_fwd = torch.compiler.disable(wrapper)
