"""m3serve.plugin.dense_extend: M3's dense layers' extend on FlashAttention-2 over a paged prefix.

The oracle is a float64 loop written here from the definition (softmax over the keys a query may see:
its request's prefix, then its request's new tokens up to itself). On the CPU the packing around the
kernel (prefix gather from scattered pool slots, new keys appended, request groups under the token budget)
runs with the PyTorch varlen path; on a GPU (`-m gpu`) the same inputs go through FA2 at M3's head shapes.
Inputs are fresh random draws, outputs poisoned before the call.
"""

from __future__ import annotations

import math

import pytest
import torch

from m3serve.plugin import dense_extend as de


def _oracle(q, k, v, k_buffer, v_buffer, qo, kv, kv_indices, scale):
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for r in range(len(qo) - 1):
        slots = kv_indices[kv[r]:kv[r + 1]].long()
        keys = torch.cat([k_buffer[slots], k[qo[r]:qo[r + 1]]]).double().repeat_interleave(group, 1)
        vals = torch.cat([v_buffer[slots], v[qo[r]:qo[r + 1]]]).double().repeat_interleave(group, 1)
        prefix, n = kv[r + 1] - kv[r], qo[r + 1] - qo[r]
        scores = torch.einsum("thd,shd->ths", q[qo[r]:qo[r + 1]].double(), keys) * scale
        # new token i (0-based) sees the prefix and new tokens 0..i
        seen = torch.arange(prefix + n)[None, :] < (prefix + 1 + torch.arange(n))[:, None]
        scores = scores.masked_fill(~seen[:, None, :], float("-inf"))
        out[qo[r]:qo[r + 1]] = torch.einsum("ths,shd->thd", torch.softmax(scores, -1), vals)
    return out


def _case(prefix_lens, new_lens, hq, hkv, dim, dtype, device, pool_slack=37):
    total_new = sum(new_lens)
    pool = sum(prefix_lens) + pool_slack
    k_buffer = torch.randn(pool, hkv, dim, dtype=dtype, device=device)
    v_buffer = torch.randn(pool, hkv, dim, dtype=dtype, device=device)
    perm = torch.randperm(pool, device=device)[: sum(prefix_lens)].to(torch.int32)  # scattered slots
    q = torch.randn(total_new, hq, dim, dtype=dtype, device=device)
    k = torch.randn(total_new, hkv, dim, dtype=dtype, device=device)
    v = torch.randn(total_new, hkv, dim, dtype=dtype, device=device)
    qo, kv = [0], [0]
    for p, n in zip(prefix_lens, new_lens):
        qo.append(qo[-1] + n)
        kv.append(kv[-1] + p)
    return q, k, v, k_buffer, v_buffer, qo, kv, perm


def _check(prefix_lens, new_lens, hq, hkv, dim, dtype, device, attention, budget, tol):
    q, k, v, kb, vb, qo, kv, idx = _case(prefix_lens, new_lens, hq, hkv, dim, dtype, device)
    scale = 1 / math.sqrt(dim)
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    de.paged_extend_attention(q, k, v, kb, vb, qo, kv, idx, scale, out, attention, budget)
    want = _oracle(q.cpu(), k.cpu(), v.cpu(), kb.cpu(), vb.cpu(), qo, kv, idx.cpu(), scale)
    got = out.cpu().double()
    assert torch.isfinite(got).all(), "rows left unwritten"
    err = ((got - want).norm() / want.norm()).item()
    assert err < tol, err
    return err


# Prefixes: none, under one 128-token page, off the page grid, exactly 16 pages; new tokens 1 to a few hundred.
SHAPES = [([0], [70]), ([5, 0, 300], [1, 40, 17]), ([2048, 129], [33, 200]), ([1000, 3, 640, 0], [9, 64, 1, 128])]


@pytest.mark.parametrize("prefix_lens,new_lens", SHAPES)
def test_packing_matches_oracle_cpu(prefix_lens, new_lens):
    # small heads on the CPU (the oracle is a Python loop); budget 600 forces several request groups
    _check(prefix_lens, new_lens, 4, 2, 16, torch.float32, "cpu", de.reference_varlen, budget=600, tol=1e-5)


def test_request_groups_respect_budget():
    assert de.request_groups([100, 100, 100], [10, 10, 10], 230) == [(0, 2), (2, 3)]
    assert de.request_groups([1000, 5], [1, 1], 10) == [(0, 1), (1, 2)]  # one request over the budget: alone
    assert de.request_groups([], [], 10) == []
    groups = de.request_groups([7] * 9, [3] * 9, 25)
    assert [g for rng in groups for g in range(*rng)] == list(range(9))
    assert all(sum(10 for _ in range(*g)) <= 25 for g in groups)


def test_budget_env_is_checked(monkeypatch):
    monkeypatch.setenv(de.BUDGET_ENV, "0")
    with pytest.raises(ValueError, match=de.BUDGET_ENV):
        de.token_budget()
    monkeypatch.setenv(de.BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="positive integer"):
        de.token_budget()


def test_hook_leaves_unserved_calls_to_sglang():
    calls = []

    def original(backend, layer, *args, **kwargs):
        calls.append(len(args))
        return "sglang"

    backend = type("Backend", (), {"dllm_attention": None})()
    q = torch.zeros(3, 4, 16)
    args = [q, q[:, :2], q[:, :2], q, q, q, torch.tensor([0, 3]), torch.tensor([0, 0]), torch.zeros(0),
            None, True, None, 3, 1.0, 1.0, 0.25]
    assert de.flash_extend(original, backend, object(), *args) == "sglang"  # CPU tensors: not FA2's
    assert de.flash_extend(original, backend, object(), *args[:-1]) == "sglang"  # unknown signature
    assert calls == [16, 15]
    reasons = de._unserved(dict(zip(de._ARGS, args)), {"logit_cap": 30.0})
    assert reasons == "not CUDA"


@pytest.mark.gpu
@pytest.mark.parametrize("prefix_lens,new_lens", SHAPES + [([3000, 2500], [300, 257])])
@pytest.mark.parametrize("heads", [(64, 4), (16, 1), (8, 1)])  # M3, and its per-GPU splits at TP 4 and 8
def test_flash_matches_oracle_gpu(prefix_lens, new_lens, heads):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    hq, hkv = heads
    err = _check(prefix_lens, new_lens, hq, hkv, 128, torch.bfloat16, "cuda", de.flash_varlen, budget=4096,
                 tol=1.5e-2)
    print(f"FA2 extend {prefix_lens}/{new_lens} {hq}/{hkv} heads: rel err {err:.2e}")


@pytest.mark.gpu
def test_hook_runs_flash_gpu(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v, kb, vb, qo, kv, idx = _case([700, 0], [90, 5], 64, 4, 128, torch.bfloat16, "cuda")
    o = torch.full_like(q, float("nan"))
    backend = type("Backend", (), {"dllm_attention": None})()
    args = [q, k, v, o, kb, vb, torch.tensor(qo, device="cuda"), torch.tensor(kv, device="cuda"), idx,
            None, True, None, max(90, 5), 1.0, 1.0, 128**-0.5]

    def original(*a, **kw):
        raise AssertionError("SGLang's kernel should not run for a call FA2 serves")

    de.flash_extend(original, backend, object(), *args, logit_cap=0.0, sliding_window_size=-1, sinks=None,
                    window_kv_offsets=None, xai_temperature_len=-1, page_size=128, score_mod=None,
                    aux_tensors=None, extend_seq_lens_cpu=[90, 5])
    want = _oracle(q.cpu(), k.cpu(), v.cpu(), kb.cpu(), vb.cpu(), qo, kv, idx.cpu(), 128**-0.5)
    err = ((o.cpu().double() - want).norm() / want.norm()).item()
    assert err < 1.5e-2, err
    monkeypatch.setenv(de.SWITCH_ENV, "triton")
    called = []
    de.flash_extend(lambda *a, **kw: called.append(1), backend, object(), *args)
    assert called == [1]
