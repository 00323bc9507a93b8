"""The e4m3 -> fp16 widening by bit operations on 32-bit words (`_attn_common.e4m3_words_to_f16`) that the fp8
decode attention uses, checked on every e4m3 value under the Triton interpreter (a child process, as the
interpreter must be on before triton is imported), and the word view's fallback for misaligned caches."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from interpreter_child import interpreter_report as run_interpreter_child


def _widen_every_value() -> dict:
    from msa_kernels.triton._attn_common import E4M3_WORDS_GAIN

    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # e4m3fn's two NaN codes: not produced by a cache write
    # every code once, in a shuffled order and at every byte position of a word, padded by random codes
    raw = codes[torch.randperm(len(codes))]
    raw = torch.cat([raw, codes[torch.randint(0, len(codes), (16 * 64 - len(raw),))]]).reshape(16, 64)
    want = raw.view(torch.float8_e4m3fn).float()
    out = torch.full((16, 64), float("nan"), dtype=torch.float16)
    widen[(1,)](raw.view(torch.int32), out, R=16, W=16)
    got = out.float() * E4M3_WORDS_GAIN
    return {"values": len(codes), "mismatches": int((got != want).sum()),
            "sign_mismatches": int((torch.signbit(got) != torch.signbit(want)).sum())}


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    return run_interpreter_child(__file__, timeout=300)


def test_every_e4m3_value_widens_exactly(interpreter_report: dict) -> None:
    row = interpreter_report.get("widen")
    assert row is not None and "error" not in row, row
    assert row["values"] == 254
    assert row["mismatches"] == 0 and row["sign_mismatches"] == 0, row


def test_word_view_only_for_whole_words() -> None:
    from msa_kernels.triton._attn_common import e4m3_words

    cache = torch.zeros(256, 4, 128, dtype=torch.float8_e4m3fn)
    words = e4m3_words(cache)
    assert words is not None and words.shape == (256, 4, 32) and words.dtype == torch.int32
    assert words.data_ptr() == cache.data_ptr()
    assert e4m3_words(cache.view(torch.uint8)[:, :, 1:].view(torch.float8_e4m3fn)) is None  # odd offset, D 127
    odd_stride = torch.zeros(256, 4 * 128 + 2, dtype=torch.float8_e4m3fn)[:, : 4 * 128].view(256, 4, 128)
    assert e4m3_words(odd_stride) is None


if __name__ == "__main__" and "--child" in sys.argv:
    # The kernel lives at module level so that Triton resolves the helper it calls from this module's globals.
    import triton
    import triton.language as tl

    from msa_kernels.triton._attn_common import e4m3_words_to_f16

    @triton.jit
    def widen(w_ptr, o_ptr, R: tl.constexpr, W: tl.constexpr):
        r = tl.arange(0, R)
        c = tl.arange(0, W)
        x = e4m3_words_to_f16(tl.load(w_ptr + r[:, None] * W + c[None, :]), R, W)
        tl.store(o_ptr + r[:, None] * 4 * W + tl.arange(0, 4 * W)[None, :], x)

    try:
        print(json.dumps({"name": "widen", **_widen_every_value()}), flush=True)
    except Exception as exc:
        print(json.dumps({"name": "widen", "error": f"{type(exc).__name__}: {exc}"}), flush=True)
