"""RMSNorm in one launch: optional residual add, fp32 statistics, plain or Gemma (1 + w) weight.

Matches SGLang's torch-native forwards (`RMSNorm.forward_native`, `GemmaRMSNorm.forward_native`),
including where they round:
  * Gemma: the residual sum is taken in the input dtype (`x + residual`), and that rounded sum is both the
    new residual and the input of the norm;
  * plain: the sum is taken in fp32; the new residual is that sum rounded to the input dtype, while the
    norm uses the unrounded fp32 sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n_rows, n_cols, x_stride, res_stride, out_stride, res_out_stride, eps,
    HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + r64[:, None] * res_stride + cols[None, :], mask=mask, other=0.0)
        total = xf + res.to(tl.float32)
        rounded = total.to(x.dtype)
        tl.store(res_out_ptr + r64[:, None] * res_out_stride + cols[None, :], rounded, mask=mask)
        if GEMMA:
            xf = rounded.to(tl.float32)  # Gemma's native forward adds in the input dtype
        else:
            xf = total
    mean_sq = tl.sum(xf * xf, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)  # sqrt then divide: closer to torch.rsqrt than the fast rsqrt
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    if GEMMA:
        w = 1.0 + w
    y = xf * rstd[:, None] * w[None, :]
    tl.store(out_ptr + r64[:, None] * out_stride + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, name: str, n_cols: int) -> torch.Tensor:
    if t.shape[-1] != n_cols:
        raise ValueError(f"rms_norm: {name} has last dimension {t.shape[-1]}, expected {n_cols}")
    t2 = t.reshape(-1, n_cols)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    gemma: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Normalize the rows (last dimension) of `x`: `x / rms(x) * w`, or `* (1 + w)` when `gemma`.

    With `residual`, normalizes `x + residual` and returns `(normalized, x + residual)`, both new tensors in
    `x`'s shape and dtype (the inputs are not modified). Statistics in fp32.
    """
    if x.dtype not in _DTYPES:
        raise ValueError(f"rms_norm: unsupported dtype {x.dtype}")
    n_cols = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n_cols:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {n_cols}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} does not match "
                         f"x {tuple(x.shape)} {x.dtype}")
    x2 = _rows(x, "x", n_cols)
    n_rows = x2.shape[0]
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    if residual is not None:
        res2 = _rows(residual, "residual", n_cols)
        res_out = torch.empty_like(out)
    else:
        res2 = res_out = out  # unused (HAS_RESIDUAL is off)
    if n_rows > 0:
        block_d = triton.next_power_of_2(n_cols)
        block_r = max(1, min(64, 2048 // block_d))  # several short rows (per-head norms) per program
        num_warps = max(1, min(16, block_r * block_d // 256))
        grid = (triton.cdiv(n_rows, block_r),)
        _rms_norm_kernel[grid](
            x2, res2, weight, out, res_out,
            n_rows, n_cols, x2.stride(0), res2.stride(0), out.stride(0), res_out.stride(0), float(eps),
            HAS_RESIDUAL=residual is not None, GEMMA=gemma, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=num_warps,
        )
    out = out.reshape(x.shape)
    if residual is None:
        return out
    return out, res_out.reshape(x.shape)
