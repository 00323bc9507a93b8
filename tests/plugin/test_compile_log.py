"""m3serve.plugin.compile_log: one stderr line per Triton specialization, chained to any earlier listener."""

from __future__ import annotations

import types

import pytest

from m3serve.plugin import compile_log


def _fake_src():
    fn = types.SimpleNamespace(arg_names=["x_ptr", "KS", "FINAL", "unused"])
    return types.SimpleNamespace(name="_score_kernel", fn=fn, constants={(1,): 16, (2,): True, (3,): None})


def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv(compile_log.ENV, raising=False)
    assert compile_log.install() is False


def test_logs_and_chains(monkeypatch, capsys):
    knobs = pytest.importorskip("triton.knobs")
    seen = []
    monkeypatch.setattr(knobs.compilation, "listener", lambda **kw: seen.append(kw["cache_hit"]))
    monkeypatch.setenv(compile_log.ENV, "1")
    assert compile_log.install() is True
    knobs.compilation.listener(src=_fake_src(), metadata={}, metadata_group={},
                               times=types.SimpleNamespace(total=2_500_000), cache_hit=False)
    knobs.compilation.listener(src=_fake_src(), metadata={}, metadata_group={},
                               times=types.SimpleNamespace(total=40_000), cache_hit=True)
    err = capsys.readouterr().err.splitlines()
    assert seen == [False, True]  # the earlier listener still runs
    assert err[0].startswith("[m3serve] triton compile _score_kernel 2500 ms at ") and err[0].endswith("KS=16 FINAL=True")
    assert err[1].startswith("[m3serve] triton load _score_kernel 40 ms")
