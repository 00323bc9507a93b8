"""The grouped MoE kernels (m3serve.plugin.moe_grouped) against the expert loop, on the CPU.

The kernels run under the Triton interpreter in a child process (TRITON_INTERPRET must be set before
triton is imported). Inputs are drawn fresh each run; the output buffer is never pre-zeroed by the caller,
and a tile list that misses or repeats a pair would leave rows wrong, which the comparison catches.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from interpreter_child import interpreted_main, run_interpreted


def _layer(experts: int, hidden: int, inter: int, dtype):
    return SimpleNamespace(
        num_experts=experts,
        w13_weight=torch.randn(experts, 2 * inter, hidden, dtype=dtype) / hidden**0.5,
        w2_weight=torch.randn(experts, hidden, inter, dtype=dtype) / inter**0.5,
    )


def _cfg():
    return SimpleNamespace(gemm1_alpha=1.702, gemm1_clamp_limit=7.0, apply_router_weight_on_input=False,
                           activation="silu", gate_up_interleaved=False)


def _routing(tokens: int, experts: int, k: int, skewed: bool):
    logits = torch.randn(tokens, experts)
    if skewed:  # most tokens pick the same experts: tiles of one expert span many blocks
        logits[:, :k] += 10.0
    weights, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return weights, ids.to(torch.int32)


def _moe_case(tokens: int, experts: int, k: int, hidden: int, inter: int, skewed: bool = False):
    from m3serve.plugin.moe_grouped import grouped_moe_swiglu_oai
    from m3serve.plugin.moe_layout import moe_halves_forward

    layer, cfg = _layer(experts, hidden, inter, torch.float32), _cfg()
    x = torch.randn(tokens, hidden)
    weights, ids = _routing(tokens, experts, k, skewed)
    got = grouped_moe_swiglu_oai(x, layer.w13_weight, layer.w2_weight, weights, ids, cfg.gemm1_alpha,
                                 cfg.gemm1_clamp_limit)
    want = moe_halves_forward(layer, x, (weights, ids, None), cfg)
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
    assert got.shape == want.shape and err < 1e-4, f"relative error {err}"
    return {"tokens": tokens, "rel_err": err}


def case_decode_sizes():
    return [_moe_case(t, 6, 2, 96, 80) for t in (1, 3, 8)]


def case_large_block_and_skew():
    # 300 pairs -> the 64-row tiles; skewed routing puts >64 pairs on single experts.
    return [_moe_case(150, 5, 2, 64, 48, skewed=True), _moe_case(40, 7, 3, 72, 40, skewed=False)]


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_grouped_moe_interpreter(name):
    rows = run_interpreted(__file__, name)
    assert all(r["rel_err"] < 1e-4 for r in rows)


@pytest.mark.parametrize("tokens,experts,k,block_m", [(1, 4, 2, 16), (8, 16, 4, 16), (300, 5, 3, 64), (7, 3, 3, 16)])
def test_expert_tiles_cover_every_pair_once(tokens, experts, k, block_m):
    from m3serve.plugin.moe_grouped import expert_tiles

    ids = torch.randint(0, experts, (tokens, k), dtype=torch.int32)
    pairs, expert, first, rows, n_tiles = expert_tiles(ids, experts, block_m)
    n = int(n_tiles)
    assert expert.shape[0] >= n
    seen = []
    for t in range(n):
        r = int(rows[t])
        assert 1 <= r <= block_m, f"tile {t} has {r} rows"
        chunk = pairs[int(first[t]) : int(first[t]) + r].long()
        assert bool((ids.reshape(-1)[chunk] == expert[t]).all()), "a tile mixes experts"
        seen += chunk.tolist()
    assert sorted(seen) == list(range(tokens * k))


def test_bad_inputs_are_named():
    from m3serve.plugin.moe_grouped import MoEKernelInputError, grouped_moe_swiglu_oai

    layer = _layer(4, 32, 16, torch.float32)
    x = torch.randn(3, 32)
    w, ids = _routing(3, 4, 2, False)
    with pytest.raises(MoEKernelInputError, match="shapes disagree"):
        grouped_moe_swiglu_oai(torch.randn(3, 31), layer.w13_weight, layer.w2_weight, w, ids, 1.0, 7.0)
    with pytest.raises(MoEKernelInputError, match=r"\[T, k\]"):
        grouped_moe_swiglu_oai(x, layer.w13_weight, layer.w2_weight, w[:2], ids[:2], 1.0, 7.0)


def test_path_choice(monkeypatch):
    from m3serve.plugin import moe_layout

    layer, cfg = SimpleNamespace(), _cfg()
    cpu = torch.zeros(4, 8)
    assert not moe_layout.use_grouped(layer, cpu, cfg)  # CPU always loops
    monkeypatch.setenv(moe_layout.MOE_PATH_ENV, "sometimes")
    fake_cuda = SimpleNamespace(is_cuda=True, shape=(4, 8))
    with pytest.raises(ValueError, match="M3SERVE_MOE"):
        moe_layout.use_grouped(layer, fake_cuda, cfg)


if __name__ == "__main__":
    interpreted_main(CASES)
