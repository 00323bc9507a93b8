"""M3's dense (full-attention) layers in prefill/extend on FlashAttention-2 instead of SGLang's Triton kernel.

Why: on the portable platform M3's dense layers run on SGLang's Triton attention backend (SGLang's CUDA
kernel package, with FA3, cannot be installed there). Its extend kernel reaches ~70 TFLOP/s on an H100 for an
agentic turn (a few thousand new tokens on a cached 60k prefix), so the one dense layer of the benchmark
model took about half of the time to first token: ~0.5 s of 1.1 s per turn at concurrency 8. FlashAttention-2
(shipped inside torch, `aten._flash_attention_forward`) does the same work at ~360 TFLOP/s on that card.

Seam: an AROUND hook on `TritonAttnBackend._forward_extend_kernel`, the one call through which the Triton
backend runs its extend kernel, after SGLang has written the new tokens' K/V to the pool and built the
indices. Its arguments say exactly what to compute: queries q [T, Hq, D] (requests back to back,
`qo_indptr`), the new tokens' k, v [T, Hkv, D], and each request's cached prefix as pool slots
(`kv_indices[kv_indptr[r]:kv_indptr[r+1]]` into k_buffer/v_buffer). We gather each request's prefix K/V
and append its new K/V (contiguous, request after request), then run FA2's variable-length causal kernel,
whose mask is aligned bottom-right: new token i of a request with prefix p sees keys [0, p + i]. That is
the extend mask. Requests go in groups of at most `M3SERVE_DENSE_EXTEND_TOKENS` key tokens (default 262144:
256 MiB each for K and V at 4 KV heads x 128 bf16), which bounds the temporary copy.

Calls it does not serve (custom masks, non-causal, sliding windows, sinks, logit caps, score mods, fp8
caches, dLLM, CPU tensors, GPUs before Ampere, head dims FA2 lacks) go to SGLang's kernel unchanged, as does everything when
M3SERVE_DENSE_EXTEND=triton (benchmarks: the old path).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import marker

TARGET = "sglang.srt.layers.attention.triton_backend.TritonAttnBackend._forward_extend_kernel"
SWITCH_ENV = "M3SERVE_DENSE_EXTEND"  # "flash" (default) or "triton" (SGLang's kernel, for comparisons)
BUDGET_ENV = "M3SERVE_DENSE_EXTEND_TOKENS"
DEFAULT_TOKEN_BUDGET = 262_144
_FLASH_DTYPES = (torch.bfloat16, torch.float16)
# Positional order of TritonAttnBackend._forward_extend_kernel's arguments after `layer` (sglang 0.5.23).
_ARGS = ("q", "k", "v", "o", "k_buffer", "v_buffer", "qo_indptr", "kv_indptr", "kv_indices", "custom_mask",
         "causal", "mask_indptr", "max_extend_len", "k_descale", "v_descale", "sm_scale")

VarlenAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int], float], torch.Tensor]


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int], cu_k: list[int],
                 scale: float) -> torch.Tensor:
    """FA2 variable-length causal attention (bottom-right aligned); q [Tq, Hq, D], k/v [Tk, Hkv, D]."""
    from msa_kernels.transfer import to_device  # offsets go up without a stream sync

    dev = q.device
    lens_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lens_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    out = torch.ops.aten._flash_attention_forward(
        q, k, v,
        to_device(torch.tensor(cu_q, dtype=torch.int32), dev), to_device(torch.tensor(cu_k, dtype=torch.int32), dev),
        max(lens_q), max(lens_k), 0.0, True, False, scale=scale,
    )
    return out[0]


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int], cu_k: list[int],
                     scale: float) -> torch.Tensor:
    """The same contract in plain PyTorch (float32 math, any device): the CPU path and the tests' oracle
    for the packing around the kernel."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for r in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[r], cu_q[r + 1]), slice(cu_k[r], cu_k[r + 1])
        n_q, n_k = qs.stop - qs.start, ks.stop - ks.start
        if n_q == 0:
            continue
        qr = q[qs].transpose(0, 1).float()  # [Hq, n_q, D]
        kr = k[ks].transpose(0, 1).float().repeat_interleave(group, 0)
        vr = v[ks].transpose(0, 1).float().repeat_interleave(group, 0)
        # Query i (of n_q) sits at absolute position n_k - n_q + i and sees keys up to there.
        visible = torch.arange(n_k, device=q.device)[None, :] <= (n_k - n_q + torch.arange(n_q, device=q.device))[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, attn_mask=visible, scale=scale)
        out[qs] = o.transpose(0, 1).to(out.dtype)
    return out


def token_budget() -> int:
    raw = os.environ.get(BUDGET_ENV, str(DEFAULT_TOKEN_BUDGET))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV} must be a positive integer (key tokens per FA2 call), got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{BUDGET_ENV} must be a positive integer (key tokens per FA2 call), got {value}")
    return value


def request_groups(prefix_lens: list[int], new_lens: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive request ranges [r0, r1) whose key tokens (prefix + new) stay within `budget`; a request
    longer than the budget forms a group of its own."""
    groups, start, used = [], 0, 0
    for r, (p, n) in enumerate(zip(prefix_lens, new_lens)):
        if r > start and used + p + n > budget:
            groups.append((start, r))
            start, used = r, 0
        used += p + n
    if start < len(new_lens):
        groups.append((start, len(new_lens)))
    return groups


def paged_extend_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
    qo_host: list[int], kv_host: list[int], kv_indices: torch.Tensor, scale: float, out: torch.Tensor,
    attention: VarlenAttention, budget: int,
) -> torch.Tensor:
    """Causal extend attention over a paged prefix: request r's queries q[qo_host[r]:qo_host[r+1]] see its
    prefix (pool slots kv_indices[kv_host[r]:kv_host[r+1]]) and its own new keys k/v at the same rows as
    its queries. Writes `out` [T, Hq, D] and returns it."""
    batch = len(qo_host) - 1
    if len(kv_host) != batch + 1:
        raise ValueError(f"qo_indptr has {batch} requests, kv_indptr {len(kv_host) - 1}")
    new_lens = [qo_host[r + 1] - qo_host[r] for r in range(batch)]
    prefix_lens = [kv_host[r + 1] - kv_host[r] for r in range(batch)]
    for r0, r1 in request_groups(prefix_lens, new_lens, budget):
        cu_k = [0]
        for r in range(r0, r1):
            cu_k.append(cu_k[-1] + prefix_lens[r] + new_lens[r])
        keys = k.new_empty(cu_k[-1], *k.shape[1:])
        values = v.new_empty(cu_k[-1], *v.shape[1:])
        for i, r in enumerate(range(r0, r1)):
            at, p = cu_k[i], prefix_lens[r]
            if p:
                slots = kv_indices[kv_host[r]:kv_host[r + 1]].long()
                torch.index_select(k_buffer, 0, slots, out=keys[at:at + p])
                torch.index_select(v_buffer, 0, slots, out=values[at:at + p])
            keys[at + p:cu_k[i + 1]] = k[qo_host[r]:qo_host[r + 1]]
            values[at + p:cu_k[i + 1]] = v[qo_host[r]:qo_host[r + 1]]
        cu_q = [qo_host[r] - qo_host[r0] for r in range(r0, r1 + 1)]
        rows = slice(qo_host[r0], qo_host[r1])
        out[rows] = attention(q[rows], keys, values, cu_q, cu_k, scale)
    return out


def _unserved(args: dict, kwargs: dict) -> str | None:
    """Why this call is not one FA2 serves here (None when it is)."""
    q, k, k_buffer = args["q"], args["k"], args["k_buffer"]
    checks = [
        (os.environ.get(SWITCH_ENV, "flash") == "triton", f"{SWITCH_ENV}=triton"),
        (not q.is_cuda, "not CUDA"),
        (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 8, "GPU older than Ampere (no FA2)"),
        (args["custom_mask"] is not None, "custom mask"),
        (not args["causal"], "non-causal"),
        (kwargs.get("logit_cap") not in (None, 0, 0.0), "logit cap"),
        (kwargs.get("sliding_window_size") not in (None, -1), "sliding window"),
        (kwargs.get("sinks") is not None, "attention sinks"),
        (kwargs.get("window_kv_offsets") is not None, "window offsets"),
        (kwargs.get("xai_temperature_len") not in (None, -1, 0), "xai temperature"),
        (kwargs.get("score_mod") is not None or kwargs.get("aux_tensors") is not None, "score mod"),
        (args["k_descale"] != 1.0 or args["v_descale"] != 1.0, "scaled (fp8) cache"),
        (q.dtype not in _FLASH_DTYPES or k.dtype != q.dtype or k_buffer.dtype != q.dtype, "dtype"),
        (q.shape[-1] != k.shape[-1] or args["v"].shape[-1] != q.shape[-1] or q.shape[-1] > 256
         or q.shape[-1] % 8, "head dims"),
        (q.shape[1] % k.shape[1] != 0, "head groups"),
    ]
    return next((why for bad, why in checks if bad), None)


def _kv_indptr_host(backend, kv_indptr: torch.Tensor) -> list[int]:
    """kv_indptr on the host, read once per forward batch: every dense layer of a batch gets the same tensor,
    and each read is a stream sync (M3 has three dense layers). The cache holds the tensor itself, so its
    identity cannot be reused by a later batch while cached."""
    cached = getattr(backend, "_m3serve_kv_indptr_host", None)
    if cached is not None and cached[0] is kv_indptr:
        return cached[1]
    host = [int(x) for x in kv_indptr.tolist()]
    backend._m3serve_kv_indptr_host = (kv_indptr, host)
    return host


def flash_extend(original, backend, layer, *args, **kwargs):
    """AROUND hook on TritonAttnBackend._forward_extend_kernel: FA2 for the calls it serves, else SGLang."""
    if len(args) != len(_ARGS) or getattr(backend, "dllm_attention", None) is not None:
        return original(backend, layer, *args, **kwargs)
    named = dict(zip(_ARGS, args))
    why = _unserved(named, kwargs)
    if why is not None:
        marker.record("dense_extend_triton", f"dense extend on SGLang's Triton kernel ({why})")
        return original(backend, layer, *args, **kwargs)
    seq_cpu = kwargs.get("extend_seq_lens_cpu")
    qo_host = [0]
    if seq_cpu is not None and len(seq_cpu) == named["qo_indptr"].shape[0] - 1:
        for n in seq_cpu:
            qo_host.append(qo_host[-1] + int(n))
    else:
        qo_host = [int(x) for x in named["qo_indptr"].tolist()]
    kv_host = _kv_indptr_host(backend, named["kv_indptr"])
    paged_extend_attention(
        named["q"], named["k"], named["v"], named["k_buffer"], named["v_buffer"], qo_host, kv_host,
        named["kv_indices"], float(named["sm_scale"]), named["o"], flash_varlen, token_budget(),
    )
    marker.record("dense_extend_flash", "M3 dense-layer extend ran FlashAttention-2 (m3serve.plugin.dense_extend)")
    return named["o"]
