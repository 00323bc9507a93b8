"""The public ops: each dispatches to its Triton kernel on CUDA and to its pure-PyTorch reference elsewhere.

`backend` is "auto" (Triton on CUDA tensors when Triton is importable, else the reference), "triton"
(fail loudly if it cannot run) or "reference". Kernel modules live in `msa_kernels.triton`; each exposes
the same signature as the op it implements.
"""

from __future__ import annotations

import importlib

import torch

from . import reference
from .layout import MSAInputError
from .plan import MSAPlan

_BACKENDS = ("auto", "triton", "reference")


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend not in _BACKENDS:
        raise MSAInputError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "triton":
        if not on_cuda:
            raise MSAInputError("backend='triton' needs CUDA tensors")
        return True
    if not on_cuda:
        return False
    try:
        importlib.import_module("triton")
    except ImportError:  # pragma: no cover - CUDA torch ships triton
        return False
    return True


def _kernel(module: str, name: str):
    return getattr(importlib.import_module(f"msa_kernels.triton.{module}"), name)


def store(
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index_k: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    index_k_cache: torch.Tensor | None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    backend: str = "auto",
) -> None:
    """Write the new tokens' K, V and index-K into their slots (one launch on GPU)."""
    if _use_triton(backend, k, k_cache):
        return _kernel("store", "store")(slots, k, v, index_k, k_cache, v_cache, index_k_cache, k_scale, v_scale)
    return reference.store(slots, k, v, index_k, k_cache, v_cache, index_k_cache, k_scale, v_scale)


def index_topk(plan: MSAPlan, q_idx: torch.Tensor, index_k_cache: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Block selection of every new token: int32 [T, H_idx, 16], ascending block ids, -1 padded."""
    if _use_triton(backend, q_idx, index_k_cache):
        return _kernel("index_topk", "index_topk")(plan, q_idx, index_k_cache)
    return reference.index_topk(plan, q_idx, index_k_cache)


def sparse_attention(
    plan: MSAPlan,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    selected: torch.Tensor,
    scale: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-sparse attention of every new token: [T, Hq, D] in q's dtype.

    On GPU, decode batches go to the paged split-K decode kernel and extend/prefill batches to the
    KV-block-major kernel.
    """
    if _use_triton(backend, q, k_cache):
        module = "decode_attention" if plan.is_decode else "extend_attention"
        return _kernel(module, "sparse_attention")(plan, q, k_cache, v_cache, selected, scale, k_scale, v_scale)
    return reference.sparse_attention_paged(plan, q, k_cache, v_cache, selected, scale, k_scale, v_scale)


def dense_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float | None = None,
    max_len: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense decode attention over each request's slot list (M3's full-attention layers): [B, Hq, D] in q's
    dtype. On GPU a chunk of slots that several requests share (a cached prefix) is read once for all of them.
    `max_len` bounds every request's length (the kernel's grid depends on it, not on the data, so the call
    captures into a CUDA graph); by default it is read from kv_indptr, a device-to-host copy."""
    if _use_triton(backend, q, k_cache):
        if max_len is None:
            max_len = int((kv_indptr[1 : q.shape[0] + 1] - kv_indptr[: q.shape[0]]).max().item()) if q.shape[0] else 1
        return _kernel("dense_decode", "dense_decode")(q, k_cache, v_cache, kv_indptr, kv_indices, scale, max_len)
    return reference.dense_decode(q, k_cache, v_cache, kv_indptr, kv_indices, scale)
