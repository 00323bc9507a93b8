"""Rotary position embedding in one launch per tensor.

Follows SGLang's `RotaryEmbedding.forward_native` (and `apply_rotary_emb`): the cache row of each token's
position holds `rotary_dim / 2` cosines then as many sines; the first `rotary_dim` values of every head
rotate (Neox: the two halves pair up; GPT-J: neighbours pair up), the rest pass through. The native forward
rounds cos and sin to the activation dtype and rounds after every product; this kernel computes in fp32 and
rounds once, as SGLang's CUDA kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, pos_ptr, cache_ptr,
    n_heads, x_tok_stride, x_head_stride, out_tok_stride, out_head_stride, cache_stride,
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < n_heads
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    cos = tl.load(cache_ptr + pos * cache_stride + i, mask=i_ok, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * cache_stride + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
    if NEOX:
        first = i
        second = i + HALF
    else:
        first = 2 * i
        second = 2 * i + 1
    x_row = x_ptr + tok * x_tok_stride + heads[:, None].to(tl.int64) * x_head_stride
    o_row = out_ptr + tok * out_tok_stride + heads[:, None].to(tl.int64) * out_head_stride
    m = head_ok[:, None] & i_ok[None, :]
    x1 = tl.load(x_row + first[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second[None, :], mask=m, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(o_row + first[None, :], o1.to(dtype), mask=m)
    tl.store(o_row + second[None, :], o2.to(dtype), mask=m)
    if BLOCK_PASS > 0:
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pm = head_ok[:, None] & (p < HEAD_DIM)[None, :]
        tl.store(o_row + p[None, :], tl.load(x_row + p[None, :], mask=pm, other=0.0), mask=pm)


def rotary(
    positions: torch.Tensor,
    x: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
    rotary_dim: int,
    neox: bool,
) -> torch.Tensor:
    """`x` ([tokens, ...] holding heads of `head_dim`) rotated by each token's position; a new contiguous
    tensor of `x`'s shape and dtype.

    `positions`: [tokens] integer positions; `cos_sin_cache`: [max_position, rotary_dim] (cosines, then sines).
    """
    n_tokens = positions.numel()
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary: rotary_dim {rotary_dim} must be even and in (0, head_dim = {head_dim}]")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rotary_dim or cos_sin_cache.stride(1) != 1:
        raise ValueError(f"rotary: cos_sin_cache of shape {tuple(cos_sin_cache.shape)} does not hold "
                         f"rotary_dim = {rotary_dim} values per position")
    if x.numel() % max(1, n_tokens * head_dim):
        raise ValueError(f"rotary: x of shape {tuple(x.shape)} is not {n_tokens} tokens of whole heads of {head_dim}")
    if n_tokens == 0:  # (the native forward cannot view an empty batch; an empty result is the answer)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x3 = x.view(n_tokens, -1, head_dim)  # raises, like the native forward, when x cannot be viewed so
    if x3.stride(2) != 1:
        x3 = x3.contiguous()
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    n_heads = x3.shape[1]
    if n_heads > 0:
        half = rotary_dim // 2
        block_half = triton.next_power_of_2(half)
        block_h = max(1, min(triton.next_power_of_2(n_heads), 4096 // (2 * block_half)))
        pass_len = head_dim - rotary_dim
        grid = (n_tokens, triton.cdiv(n_heads, block_h))
        _rotary_kernel[grid](
            x3, out, positions.reshape(-1), cos_sin_cache,
            n_heads, x3.stride(0), x3.stride(1), out.stride(0), out.stride(1), cos_sin_cache.stride(0),
            HALF=half, HEAD_DIM=head_dim, NEOX=neox, BLOCK_H=block_h, BLOCK_HALF=block_half,
            BLOCK_PASS=triton.next_power_of_2(pass_len) if pass_len else 0,
            num_warps=4,
        )
    return out.reshape(x.shape)
