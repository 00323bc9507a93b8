"""Store: write the new tokens' K, V and index-K into their cache slots in one launch.

One program moves `_TOKENS` tokens: their K and V rows ([Hkv*D] each, scaled and cast to the cache dtype)
and their index-K row ([D]). Quantization follows the reference: an fp8 cache holds value / scale; index-K
in fp8 carries no scale (it is RMS-normed to O(1)), so it is a plain cast.

Value checks on `slots` need a device->host sync, so they run only outside CUDA-graph capture (decode
stores run inside graphs, where a sync would break capture); shape and dtype checks always run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import MSAInputError, check_cache

_TOKENS = 4  # tokens per program: 4 x (2 x 512 + 128) elements keeps each program's loads wide


@triton.jit
def _store_kernel(
    slots_ptr, n_tokens,
    k_ptr, v_ptr, ik_ptr,
    kc_ptr, vc_ptr, ikc_ptr,
    k_scale, v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ikt,
    stride_kcs, stride_kch, stride_vcs, stride_vch, stride_ikcs,
    HEADS: tl.constexpr, DIM: tl.constexpr, INDEX_DIM: tl.constexpr,
    HD_P2: tl.constexpr, ID_P2: tl.constexpr, TOKENS: tl.constexpr,
    SCALE_K: tl.constexpr, SCALE_V: tl.constexpr, HAS_INDEX: tl.constexpr,
):
    tok = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    tok_ok = tok < n_tokens
    slot = tl.load(slots_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
    tok64 = tok.to(tl.int64)

    # K and V: the Hkv*D elements of a token as one row (head h, dim d) -> column h*D + d.
    col = tl.arange(0, HD_P2)
    head = col // DIM
    dim = col % DIM
    m = tok_ok[:, None] & (col < HEADS * DIM)[None, :]
    k = tl.load(k_ptr + tok64[:, None] * stride_kt + head[None, :] * stride_kh + dim[None, :], mask=m)
    v = tl.load(v_ptr + tok64[:, None] * stride_vt + head[None, :] * stride_vh + dim[None, :], mask=m)
    if SCALE_K:
        k = k.to(tl.float32) / k_scale
    if SCALE_V:
        v = v.to(tl.float32) / v_scale
    kc = kc_ptr + slot[:, None] * stride_kcs + head[None, :] * stride_kch + dim[None, :]
    vc = vc_ptr + slot[:, None] * stride_vcs + head[None, :] * stride_vch + dim[None, :]
    # Through float32, as the reference casts: one rounding, to nearest even, into the cache dtype.
    tl.store(kc, k.to(tl.float32).to(kc_ptr.dtype.element_ty), mask=m)
    tl.store(vc, v.to(tl.float32).to(vc_ptr.dtype.element_ty), mask=m)

    if HAS_INDEX:
        icol = tl.arange(0, ID_P2)
        im = tok_ok[:, None] & (icol < INDEX_DIM)[None, :]
        ik = tl.load(ik_ptr + tok64[:, None] * stride_ikt + icol[None, :], mask=im)
        tl.store(ikc_ptr + slot[:, None] * stride_ikcs + icol[None, :], ik.to(tl.float32).to(ikc_ptr.dtype.element_ty), mask=im)


def _flat_index_k(index_k: torch.Tensor) -> torch.Tensor:
    """[T, D] or [T, 1, D] -> [T, D]."""
    if index_k.dim() == 3 and index_k.shape[1] == 1:
        return index_k[:, 0]
    if index_k.dim() != 2:
        raise MSAInputError(f"index_k must be [T, D] or [T, 1, D], got {tuple(index_k.shape)}")
    return index_k


def _check_inputs(slots, k, v, index_k, k_cache, v_cache, index_k_cache, k_scale, v_scale):
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache, heads=k_cache.shape[1], dim=k_cache.shape[2])
    if k.dim() != 3 or k.shape[1:] != k_cache.shape[1:]:
        raise MSAInputError(f"k must be [T, {k_cache.shape[1]}, {k_cache.shape[2]}], got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise MSAInputError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if slots.dim() != 1 or slots.shape[0] != k.shape[0]:
        raise MSAInputError(f"slots must be [T={k.shape[0]}], got {tuple(slots.shape)}")
    if slots.dtype not in (torch.int32, torch.int64):
        raise MSAInputError(f"slots must be int32 or int64, got {slots.dtype}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise MSAInputError("k and v must be contiguous in their last (head_dim) axis")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(-1) != 1:
            raise MSAInputError(f"{name} must be contiguous in its last axis")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is not None and scale <= 0:
            raise MSAInputError(f"{name} must be > 0, got {scale}")
    if (index_k is None) != (index_k_cache is None):
        raise MSAInputError("index_k and index_k_cache must be given together")
    if index_k is not None:
        check_cache("index_k_cache", index_k_cache, heads=1)
        if index_k_cache.shape[0] != k_cache.shape[0]:
            raise MSAInputError(
                f"index_k_cache has {index_k_cache.shape[0]} slots, k_cache {k_cache.shape[0]}"
            )
        ik = _flat_index_k(index_k)
        if ik.shape != (k.shape[0], index_k_cache.shape[2]):
            raise MSAInputError(
                f"index_k must be [T={k.shape[0]}, {index_k_cache.shape[2]}] (or [T, 1, D]), "
                f"got {tuple(index_k.shape)}"
            )
    capturing = k.is_cuda and torch.cuda.is_current_stream_capturing()
    if slots.numel() and not capturing:
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 0 or hi >= k_cache.shape[0]:
            raise MSAInputError(f"slot ids must lie in [0, {k_cache.shape[0]}), got [{lo}, {hi}]")


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
) -> None:
    """Write new tokens into their slots. k, v: [T, Hkv, D]; index_k: [T, D] or [T, 1, D]; slots: [T]."""
    _check_inputs(slots, k, v, index_k, k_cache, v_cache, index_k_cache, k_scale, v_scale)
    n_tokens = k.shape[0]
    if n_tokens == 0:
        return
    heads, dim = k.shape[1], k.shape[2]
    has_index = index_k is not None
    if has_index:
        ik = _flat_index_k(index_k)
        if ik.stride(-1) != 1:
            ik = ik.contiguous()
        ikc = index_k_cache
        index_dim, stride_ikt, stride_ikcs = ikc.shape[2], ik.stride(0), ikc.stride(0)
    else:  # dummies: the kernel never touches them (HAS_INDEX is a compile-time switch)
        ik, ikc, index_dim, stride_ikt, stride_ikcs = k, k_cache, 1, 0, 0
    grid = (triton.cdiv(n_tokens, _TOKENS),)
    _store_kernel[grid](
        slots, n_tokens,
        k, v, ik,
        k_cache, v_cache, ikc,
        float(k_scale or 1.0), float(v_scale or 1.0),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_ikt,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), stride_ikcs,
        HEADS=heads, DIM=dim, INDEX_DIM=index_dim,
        HD_P2=triton.next_power_of_2(heads * dim), ID_P2=triton.next_power_of_2(index_dim),
        TOKENS=_TOKENS, SCALE_K=bool(k_scale), SCALE_V=bool(v_scale), HAS_INDEX=has_index,
    )
