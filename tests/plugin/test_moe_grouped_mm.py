"""m3serve.plugin.moe_layout's grouped-GEMM MoE path (torch._grouped_mm) against the expert loop it replaces for
eager extends, and against a per-token oracle written here. CPU in float32; at m3-slice's shapes in bf16 and with
no stream sync on a GPU (`-m gpu`). Routing, weights and inputs are fresh random draws."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from m3serve.plugin.moe_layout import (
    moe_grouped_mm_forward,
    moe_halves_forward,
    swiglu_oai_halves,
    use_grouped_mm,
)


def _moe(e: int, h: int, i: int, t: int, k: int, device: str, dtype: torch.dtype, skip_expert: bool):
    layer = SimpleNamespace(num_experts=e, w13_weight=torch.randn(e, 2 * i, h, device=device, dtype=dtype) / h**0.5,
                            w2_weight=torch.randn(e, h, i, device=device, dtype=dtype) / i**0.5)
    x = torch.randn(t, h, device=device, dtype=dtype)
    experts = e - 1 if skip_expert else e  # an expert nobody routes to: an empty group
    ids = torch.stack([torch.randperm(experts, device=device)[:k] for _ in range(t)])
    weights = torch.rand(t, k, device=device)
    cfg = SimpleNamespace(gemm1_alpha=1.702, gemm1_clamp_limit=7.0, apply_router_weight_on_input=False)
    return layer, x, (weights, ids, None), cfg


@pytest.mark.parametrize("skip_expert", [False, True])
def test_grouped_mm_equals_the_loop_and_the_oracle(skip_expert):
    layer, x, topk, cfg = _moe(6, 32, 16, 37, 3, "cpu", torch.float32, skip_expert)
    got = moe_grouped_mm_forward(layer, x, topk, cfg)
    loop = moe_halves_forward(layer, x, topk, cfg)
    weights, ids, _ = topk
    want = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            ex = int(ids[n, j])
            act = swiglu_oai_halves(layer.w13_weight[ex] @ x[n], 1.702, 7.0)
            want[n] += weights[n, j] * (layer.w2_weight[ex] @ act)
    assert (got - loop).abs().max() < 1e-4
    assert (got - want).abs().max() < 1e-4


def test_grouped_mm_only_for_cuda_without_biases(monkeypatch):
    layer, x, _, cfg = _moe(4, 16, 8, 5, 2, "cpu", torch.float32, False)
    assert not use_grouped_mm(layer, x, cfg)  # CPU: the loop
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not use_grouped_mm(layer, x, cfg)  # pre-Hopper: the loop
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert use_grouped_mm(layer, x, cfg) == hasattr(torch, "_grouped_mm")
    monkeypatch.setenv("M3SERVE_MOE", "loop")
    assert not use_grouped_mm(layer, x, cfg)
    monkeypatch.delenv("M3SERVE_MOE")
    layer.w13_weight_bias = torch.zeros(4, 16)
    assert not use_grouped_mm(layer, x, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_mm_at_slice_shapes_on_gpu_without_sync():
    """m3-slice's MoE (16 experts x 3072, top-4, hidden 6144) on 2,048 tokens in bf16: the loop's result within
    bf16 rounding, and not one stream sync (torch's sync debug mode)."""
    layer, x, topk, cfg = _moe(16, 6144, 3072, 2048, 4, "cuda", torch.bfloat16, True)
    loop = moe_halves_forward(layer, x, topk, cfg).float()
    moe_grouped_mm_forward(layer, x, topk, cfg)  # first call outside the check (library loads)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = moe_grouped_mm_forward(layer, x, topk, cfg).float()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rel = (got - loop).norm() / loop.norm()
    assert rel < 1e-2, float(rel)
