"""The Triton store kernel on the CPU, through the Triton interpreter (one subprocess per case, see
test_index_topk_interp.py for why). Caches are poisoned before each run: the written slots must equal
the reference's and every other slot must keep its poison.

The interpreter rounds float -> bf16/fp8 conversions differently from the GPU (truncation, and a wrong
carry into the exponent for fp8), so fp8 cases use values on the fp8 grid with power-of-two scales, where
every rounding mode agrees; the GPU tests cover arbitrary values.
"""

from __future__ import annotations

import pytest
from interpreter_child import interpreted_main, run_interpreted


def _store_case(heads, tokens, cache_dtype, index_dtype, scale, index_shape3, on_grid, with_index=True):
    import torch

    from msa_kernels import reference
    from msa_kernels.triton.store import store

    slots_total, dim = 6 * 128, 128
    # K and V as views into one fused projection output: non-contiguous in the token axis.
    fused = torch.randn(tokens, 3 * heads, dim)
    ik = torch.randn(tokens, dim)
    if on_grid:  # values an fp8 cache holds exactly after division by the power-of-two scale
        fused = fused.to(torch.float8_e4m3fn).float() * (scale or 1.0)
        ik = ik.to(torch.float8_e4m3fn).float()
    fused, ik = fused.to(torch.float16), ik.to(torch.float16)
    k, v = fused[:, :heads], fused[:, heads : 2 * heads]
    if index_shape3:
        ik = ik[:, None, :]
    slots = torch.randperm(slots_total)[:tokens].to(torch.int64 if heads == 1 else torch.int32)

    def caches():
        poison = torch.full((slots_total, heads, dim), 13.0)
        return (poison.to(cache_dtype), poison.clone().to(cache_dtype),
                torch.full((slots_total, 1, dim), 13.0).to(index_dtype))

    got, want = caches(), caches()
    store(slots, k, v, ik if with_index else None, *got[:2], got[2] if with_index else None, scale, scale)
    reference.store(slots, k, v, ik if with_index else None, *want[:2], want[2] if with_index else None,
                    scale, scale)
    for name, a, b in zip(("k_cache", "v_cache", "index_k_cache"), got, want):
        assert torch.equal(a.float(), b.float()), f"{name} differs: max {(a.float() - b.float()).abs().max()}"
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots.long()] = False
    assert bool((got[0][untouched].float() == 13.0).all()), "store wrote outside its slots"
    return {"tokens": tokens, "heads": heads}


def case_fp16_four_heads():
    import torch

    return [_store_case(4, 37, torch.float16, torch.float16, None, False, False),
            _store_case(4, 9, torch.float16, torch.float16, None, True, False, with_index=False)]


def case_scaled_and_one_head():
    import torch

    return [_store_case(1, 130, torch.float32, torch.float16, 0.25, True, False),
            _store_case(2, 5, torch.float16, torch.float32, None, False, False)]


def case_fp8():
    import torch

    e4m3 = torch.float8_e4m3fn
    return [_store_case(4, 21, e4m3, e4m3, 0.5, False, True),
            _store_case(1, 3, e4m3, e4m3, None, True, True)]


def case_bad_inputs():
    import torch

    from msa_kernels import MSAInputError
    from msa_kernels.triton.store import store

    kc, vc, ic = torch.zeros(256, 4, 128), torch.zeros(256, 4, 128), torch.zeros(256, 1, 128)
    k = torch.randn(3, 4, 128)
    ik = torch.randn(3, 128)
    ok_slots = torch.tensor([0, 5, 255])
    problems = {
        "slot range": lambda: store(torch.tensor([0, 5, 256]), k, k, ik, kc, vc, ic),
        "negative slot": lambda: store(torch.tensor([-1, 5, 6]), k, k, ik, kc, vc, ic),
        "slots shape": lambda: store(ok_slots[:2], k, k, ik, kc, vc, ic),
        "k heads": lambda: store(ok_slots, k[:, :2], k[:, :2], ik, kc, vc, ic),
        "index without cache": lambda: store(ok_slots, k, k, ik, kc, vc, None),
        "index dim": lambda: store(ok_slots, k, k, ik[:, :64], kc, vc, ic),
        "scale": lambda: store(ok_slots, k, k, ik, kc, vc, ic, -1.0, None),
        "cache pages": lambda: store(ok_slots, k, k, ik, kc[:200], vc[:200], ic[:200]),
    }
    seen = {}
    for name, call in problems.items():
        try:
            call()
        except MSAInputError as e:
            seen[name] = str(e)
        else:
            raise AssertionError(f"{name}: no MSAInputError")
    store(ok_slots[:0], k[:0], k[:0], ik[:0], kc, vc, ic)  # no tokens: a no-op
    assert not bool(kc.any())
    return seen


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_store_interpreter(name):
    run_interpreted(__file__, name, timeout=300)


if __name__ == "__main__":
    interpreted_main(CASES)
