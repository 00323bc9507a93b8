"""m3serve.plugin.dense_decode: M3's dense layers' decode on the shared-prefix kernel, behind SGLang's own.

The hook replaces a TritonAttnBackend's `decode_attention_fwd`. Checked here: it is registered; calls it does
not cover reach SGLang's function unchanged; the switch turns it off; and, under the Triton interpreter (a
child process), the replacement gives SGLang's answer for SGLang's own arguments on a shared prefix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from m3serve.plugin import dense_decode as dd

HERE = Path(__file__).resolve().parent


def _call(q, k, v, indptr, indices, **opts) -> dict:
    batch, heads, dim = q.shape
    splits = 4
    args = dict(q=q, k_buffer=k, v_buffer=v, o=torch.full_like(q, float("nan")), kv_indptr=indptr,
                kv_indices=indices.long(), attn_logits=torch.empty(batch, heads, splits, dim),
                attn_lse=torch.empty(batch, heads, splits), num_kv_splits=torch.full((batch,), splits, dtype=torch.int32),
                max_kv_splits=splits, sm_scale=dim ** -0.5, k_scale=1.0, v_scale=1.0)
    args.update(opts)
    return args


def _tensors(batch=3, hq=16, hkv=1, dim=64, dtype=torch.float16):
    q = torch.randn(batch, hq, dim).to(dtype)
    k = torch.randn(50, hkv, dim).to(dtype)
    v = torch.randn(50, hkv, dim).to(dtype)
    indptr = torch.tensor([0, 10, 20, 30][: batch + 1], dtype=torch.int32)
    return q, k, v, indptr, torch.arange(30, dtype=torch.int32)


def test_registered_as_an_after_hook_on_the_triton_backend():
    from m3serve import plugin

    hooks = {t: (h, kind) for t, h, kind in plugin.hooks()}
    assert hooks[dd.TARGET] == (dd.install_shared_decode, "AFTER")
    assert dd.TARGET.endswith("TritonAttnBackend.__init__")


def test_install_wraps_once_and_the_switch_keeps_sglang(monkeypatch):
    original = object()
    backend = SimpleNamespace(decode_attention_fwd=original, max_context_len=131_072)
    monkeypatch.setenv(dd.SWITCH_ENV, "triton")
    dd.install_shared_decode(None, backend)
    assert backend.decode_attention_fwd is original
    monkeypatch.delenv(dd.SWITCH_ENV)
    dd.install_shared_decode(None, backend)
    wrapped = getattr(backend, dd.WRAPPER_ATTR)
    assert isinstance(wrapped, dd.SharedPrefixDecode) and wrapped.original is original and wrapped.max_len == 131_072
    assert backend.decode_attention_fwd is not original
    installed = backend.decode_attention_fwd
    dd.install_shared_decode(None, backend)  # a second __init__ hook call does not wrap the wrapper
    assert backend.decode_attention_fwd is installed


def test_uncovered_calls_reach_sglang_unchanged(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seen = []
    wrapped = dd.SharedPrefixDecode(lambda *a, **kw: seen.append((a, kw)) or "sglang", 4096)
    args = _call(*_tensors())
    positional = [args[name] for name in dd._ARGS[:13]]
    assert wrapped(*positional, logit_cap=0.0, page_size=128) == "sglang"  # CPU tensors: not served
    assert seen[0][0] == tuple(positional) and seen[0][1] == {"logit_cap": 0.0, "page_size": 128}


@pytest.mark.parametrize("change, reason", [
    ({"logit_cap": 30.0}, "logit cap"), ({"sinks": torch.zeros(16)}, "sinks"), ({"has_mla": True}, "MLA"),
    ({"score_mod": object()}, "score_mod"), ({"xai_temperature_len": 8}, "temperature"),
    ({"k_scale": 0.5}, "fp8"), ({"v_scale": 2.0}, "fp8"),
])
def test_reasons_not_served(monkeypatch, change, reason):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that the device is not the reason
    call = _call(*_tensors())
    assert dd.reason_not_served(call) is None
    call.update(change)
    assert reason in dd.reason_not_served(call)


def test_reasons_not_served_for_layouts(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "dtypes" in dd.reason_not_served(_call(*_tensors(dtype=torch.float32)))
    assert "query heads" in dd.reason_not_served(_call(*_tensors(hq=12, hkv=4)))
    q, k, v, indptr, indices = _tensors()
    assert "shapes" in dd.reason_not_served(_call(q, k[:, :, :32], v[:, :, :32], indptr, indices))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in dd.reason_not_served(_call(*_tensors()))


def test_replacement_matches_sglang_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), str(HERE.parent / "kernels"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                          timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and rows, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in rows:
        assert row["served"], row  # the shared-prefix kernel ran, not SGLang's
        assert row["max_abs_diff"] < 2e-3, row


def _child() -> None:
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from test_dense_decode import build

    from m3serve.plugin import marker

    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    for case in ("m3_group16_exactly_16_blocks", "prefix_2500_mixed_tails_empty_request"):
        q, k, v, indptr, indices = build(case)
        want = _call(q, k, v, indptr, indices)
        got = _call(q, k, v, indptr, indices)
        keep = ("o", "attn_logits", "attn_lse")
        got.update({name: want[name].clone() for name in keep})
        decode_attention_fwd(**want)
        backend = SimpleNamespace(decode_attention_fwd=decode_attention_fwd, max_context_len=8192)
        dd.install_shared_decode(None, backend)
        before = marker.counts().get("dense_decode_shared", 0)
        backend.decode_attention_fwd(*[got[name] for name in dd._ARGS[:13]])
        served = marker.counts().get("dense_decode_shared", 0) == before + 1
        lengths = indptr[1:] - indptr[:-1]
        live = lengths > 0  # SGLang's kernel leaves a request without keys unwritten (NaN here)
        diff = (got["o"][live].float() - want["o"][live].float()).abs().max().item()
        empty_zero = bool((got["o"][~live] == 0).all())
        print(json.dumps({"case": case, "served": served, "max_abs_diff": diff, "empty_rows_zero": empty_zero}))


if __name__ == "__main__" and "--child" in sys.argv:
    _child()
