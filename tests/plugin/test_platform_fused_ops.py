"""The portable CUDA platform's fused norms and rotary embeddings (m3serve.platform.cuda_ops) against SGLang's
own torch-native forwards, their oracle.

The kernels run under the Triton interpreter in a child process (it must be on before triton is imported),
on SGLang's real op modules with random weights drawn fresh each run, with every output buffer the kernels
allocate poisoned with NaN first. The same cases run on a GPU at M3's shapes (`-m gpu`). The dispatch tests
check that SGLang routes its ops to these forwards under the platform's key and only there.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from interpreter_child import interpreter_report as run_interpreter_child

# bf16 keeps 8 bits of mantissa: one rounding step of a value near 4 is 2^-5. The kernels round once, the
# native forwards after every op, so they may differ by a few steps; the fp32 oracle bounds the kernels tighter.
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _gemma(hidden: int, dtype: torch.dtype, device: str):
    from sglang.srt.layers.layernorm import GemmaRMSNorm

    op = GemmaRMSNorm(hidden, eps=1e-6).to(device)
    op.weight.data = torch.randn(hidden, device=device) * 0.3  # Gemma's weight is the offset from 1
    return op


def _rms(hidden: int, dtype: torch.dtype, device: str, **kw):
    from sglang.srt.layers.layernorm import RMSNorm

    op = RMSNorm(hidden, eps=1e-5, **kw).to(device)
    op.weight.data = (1 + torch.randn(hidden, device=device) * 0.3).to(dtype)
    return op


class _OutOfTree:
    """Stands in for SGLang's current platform while a rotary op is built: on an out-of-tree platform (as in
    the portable worker) the op builds without looking for vLLM's or sgl_kernel's CUDA rotary."""

    def is_out_of_tree(self) -> bool:
        return True


def _rope(head: int, rotary_dim: int, neox: bool, dtype: torch.dtype, device: str):
    import sglang.srt.layers.rotary_embedding.base as base

    saved, base.current_platform = base.current_platform, _OutOfTree()
    try:
        return base.RotaryEmbedding(head, rotary_dim, 4096, 10_000, neox, dtype).to(device)
    finally:
        base.current_platform = saved


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0 if got.shape == want.shape else float("inf")
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))


def _norm_case(kind: str, rows: int, hidden: int, dtype: torch.dtype, residual: bool, device: str,
               post: bool = False) -> dict:
    from m3serve.platform.cuda_ops import sglang_forwards as f

    op = _gemma(hidden, dtype, device) if kind == "gemma" else _rms(hidden, dtype, device)
    fwd = f.gemma_rms_norm_forward if kind == "gemma" else f.rms_norm_forward
    x = torch.randn(rows, hidden, device=device).to(dtype) * 2
    res = torch.randn(rows, hidden, device=device).to(dtype) if residual else None
    add = torch.randn(rows, hidden, device=device).to(dtype) if post else None
    x0, res0 = x.clone(), None if res is None else res.clone()
    got = fwd(op, x, res, add)
    want = op.forward_native(x.clone(), None if res is None else res.clone(), add)
    if kind == "gemma":  # fp32 oracle: the same formula on the native forward's rounded residual sum
        base = x0 if res is None else want[1]
    else:
        base = x0.float() if res is None else x0.float() + res0.float() + (0 if add is None else add.float())
    oracle = (base.float() * torch.rsqrt(base.float().pow(2).mean(-1, keepdim=True) + op.variance_epsilon)
              * ((1 + op.weight.float()) if kind == "gemma" else op.weight.float()))
    row = {"inputs_unchanged": bool(torch.equal(x, x0) and (res is None or torch.equal(res, res0))),
           "nan": bool(torch.isnan(got[0] if residual else got).any())}
    if residual:
        # The residual sum is rounded once to the input dtype, as the native forward does: the same bits on a
        # GPU. The interpreter's fp32 -> bf16/fp16 cast truncates instead of rounding, so there it may sit
        # one unit in the last place below.
        ulp = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        rel = ((got[1].float() - want[1].float()).abs() / want[1].float().abs().clamp_min(1e-30))
        exact = bool(torch.equal(got[1], want[1]))
        close = bool(rel.max() <= ulp) if rel.numel() else True
        row.update(err=_err(got[0], want[0]), oracle_err=_err(got[0], oracle),
                   residual_equal=exact if device == "cuda" else close, shape_ok=got[0].shape == x.shape)
    else:
        row.update(err=_err(got, want), oracle_err=_err(got, oracle), residual_equal=True,
                   shape_ok=got.shape == x.shape)
    row["tol"] = TOL[dtype]
    return row


def _rope_case(tokens: int, heads_q: int, heads_k: int, head: int, rotary_dim: int, neox: bool,
               dtype: torch.dtype, device: str) -> dict:
    from m3serve.platform.cuda_ops import sglang_forwards as f

    op = _rope(head, rotary_dim, neox, dtype, device)
    # q and k as SGLang hands them over: column slices of one fused projection (not contiguous)
    qkv = torch.randn(tokens, (heads_q + 2 * heads_k) * head, device=device).to(dtype)
    q, k, _ = qkv.split([heads_q * head, heads_k * head, heads_k * head], dim=-1)
    pos = torch.randint(0, 4096, (tokens,), device=device)
    q0, k0 = q.clone(), k.clone()
    gq, gk = f.rotary_forward(op, pos, q, k)
    if tokens == 0:  # SGLang's native forward cannot view an empty batch: the shapes are the check
        wq, wk, oq, ok = q, k, q, k
    else:
        wq, wk = op.forward_native(pos, q.clone(), k.clone())
        op32 = _rope(head, rotary_dim, neox, torch.float32, device)
        oq, ok = op32.forward_native(pos, q0.float(), k0.float())
    return {"err": max(_err(gq, wq), _err(gk, wk)) if tokens else 0.0,
            "oracle_err": max(_err(gq, oq), _err(gk, ok)) if tokens else 0.0,
            "shape_ok": gq.shape == q.shape and gk.shape == k.shape and gq.dtype == dtype,
            "nan": bool(torch.isnan(gq).any() or torch.isnan(gk).any()),
            "inputs_unchanged": bool(torch.equal(q, q0) and torch.equal(k, k0)),
            "residual_equal": True, "tol": TOL[dtype]}


def cases(device: str, full: bool) -> dict:
    d = 6144 if full else 96
    heads = 64 if full else 6
    return {
        "gemma_per_head_bf16": lambda: _norm_case("gemma", 8 * heads + 3, 128, torch.bfloat16, False, device),
        "gemma_residual_bf16": lambda: _norm_case("gemma", 7, d, torch.bfloat16, True, device),
        "gemma_residual_post_add": lambda: _norm_case("gemma", 5, d, torch.bfloat16, True, device, post=True),
        "gemma_odd_width_fp32": lambda: _norm_case("gemma", 33, 200, torch.float32, False, device),
        "rms_residual_fp16": lambda: _norm_case("rms", 9, d + 8, torch.float16, True, device),
        "rms_plain_bf16": lambda: _norm_case("rms", 300, 128, torch.bfloat16, False, device),
        "gemma_no_rows": lambda: _norm_case("gemma", 0, 128, torch.bfloat16, False, device),
        "rope_neox_partial_bf16": lambda: _rope_case(13, heads, 4 if full else 2, 128, 64, True, torch.bfloat16,
                                                     device),
        "rope_gptj_full_fp32": lambda: _rope_case(9, 5, 1, 64, 64, False, torch.float32, device),
        "rope_neox_odd_half_fp16": lambda: _rope_case(4, 3, 1, 80, 40, True, torch.float16, device),
        "rope_no_tokens": lambda: _rope_case(0, 4, 1, 128, 64, True, torch.bfloat16, device),
    }


def _check(name: str, row: dict) -> None:
    assert row is not None and "error" not in row, (name, row)
    assert row["shape_ok"] and not row["nan"] and row["inputs_unchanged"] and row["residual_equal"], (name, row)
    assert row["err"] <= row["tol"], (name, row)  # against SGLang's native forward
    assert row["oracle_err"] <= row["tol"], (name, row)  # against the fp32 formula


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    return run_interpreter_child(__file__, timeout=600)


@pytest.mark.parametrize("name", sorted(cases("cpu", False)))
def test_fused_op_matches_native(interpreter_report: dict, name: str) -> None:
    _check(name, interpreter_report.get(name))


@pytest.fixture(scope="module")
def gpu_report() -> dict:
    """The cases at M3's shapes on the GPU, in a child process that sees SGLang as the portable CUDA worker does
    (its sitecustomize on the path: SGLang's modules then import without sgl_kernel)."""
    import subprocess

    from m3serve.serving.worker import CUDA_SITE

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (str(CUDA_SITE), os.path.dirname(here), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, SGLANG_PLATFORM="m3serve_portable", M3SERVE_DEVICE="cuda")
    proc = subprocess.run([sys.executable, __file__, "--child", "cuda"], env=env, capture_output=True, text=True,
                          timeout=600)
    report = {json.loads(line)["name"]: json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")}
    if not report:
        pytest.fail(f"GPU child produced no report:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return report


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(cases("cuda", True)))
def test_fused_op_matches_native_on_gpu(gpu_report: dict, name: str) -> None:
    _check(name, gpu_report.get(name))


def test_options_the_kernel_lacks_run_native() -> None:
    """RMSNorm options outside the kernel (here: cast before the weight) and CPU tensors take the native path."""
    from m3serve.platform.cuda_ops import sglang_forwards as f

    op = _rms(64, torch.bfloat16, "cpu", cast_x_before_out_mul=True)
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert torch.equal(f.rms_norm_forward(op, x), op.forward_native(x))
    g = _gemma(64, torch.bfloat16, "cpu")
    assert torch.equal(f.gemma_rms_norm_forward(g, x), g.forward_native(x))


def test_bad_shapes_are_named() -> None:
    from m3serve.platform.cuda_ops.norm import rms_norm
    from m3serve.platform.cuda_ops.rope import rotary

    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-6, residual=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="rotary_dim"):
        rotary(torch.zeros(2, dtype=torch.long), torch.zeros(2, 16), torch.zeros(10, 5), 8, 5, True)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary(torch.zeros(2, dtype=torch.long), torch.zeros(2, 16), torch.zeros(10, 4), 8, 8, True)


def test_sglang_dispatches_to_our_forwards_under_the_platform_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import sglang.kernels.fused_op as fused_op

    from m3serve.platform.cuda import PortableCudaPlatform
    from m3serve.platform.cuda_ops import sglang_forwards as f

    saved = {k: dict(v) for k, v in fused_op.BaseFusedOp._oot_forward_registry.items()}
    try:
        monkeypatch.setattr(f, "_registered", None)
        # SGLang asking the platform for its key registers the forwards (once)
        assert PortableCudaPlatform().get_dispatch_key_name() == f.DISPATCH_KEY
        assert set(fused_op.BaseFusedOp._oot_forward_registry[f.DISPATCH_KEY].values()) >= {
            f.gemma_rms_norm_forward, f.rms_norm_forward, f.rotary_forward}
        assert f.register_once() == 3
        monkeypatch.setattr(fused_op, "_oot_dispatch_key", lambda: f.DISPATCH_KEY)
        for op, fn in ((_gemma(32, torch.float32, "cpu"), f.gemma_rms_norm_forward),
                       (_rms(32, torch.float32, "cpu"), f.rms_norm_forward),
                       (_rope(32, 32, True, torch.float32, "cpu"), f.rotary_forward)):
            assert op._resolve_forward_method().__func__ is fn
        monkeypatch.setattr(fused_op, "_oot_dispatch_key", lambda: "native")  # another platform: untouched
        assert _gemma(32, torch.float32, "cpu")._resolve_forward_method().__func__.__name__ == "forward_native"
    finally:
        fused_op.BaseFusedOp._oot_forward_registry.clear()
        fused_op.BaseFusedOp._oot_forward_registry.update(saved)


def test_switch_off_registers_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from m3serve.platform.cuda_ops import sglang_forwards as f

    monkeypatch.setenv(f.ENV, "0")
    assert f.register() == 0


def _poison_allocations() -> None:
    """Every float buffer torch.empty / empty_like hands out in the child starts as NaN, so an element a
    kernel forgets to write shows."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*a, **k):
        t = real_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty, torch.empty_like = empty, empty_like


if __name__ == "__main__" and "--child" in sys.argv:
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    _poison_allocations()
    on_gpu = sys.argv[-1] == "cuda"
    for case_name, case in cases("cuda" if on_gpu else "cpu", on_gpu).items():
        try:
            print(json.dumps({"name": case_name, **case()}), flush=True)
        except Exception as exc:  # reported per case; the parent fails that case with the message
            print(json.dumps({"name": case_name, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
