"""`m3serve worker` start-up checks, the platform/plugin gating and the plugin's pieces, without a server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from m3serve.serving.worker import PAGE_SIZE, WorkerConfigError, build_launch


def _worker_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m3serve.cli", "worker", *argv],
                          capture_output=True, text=True, timeout=timeout)


def test_launch_has_m3_settings(tiny_checkpoint):
    launch = build_launch(["--model-path", str(tiny_checkpoint), "--device", "cpu", "--port", "1234",
                           "--max-total-tokens", "4096"], {})
    cmd = launch.command
    assert cmd[cmd.index("--page-size") + 1] == str(PAGE_SIZE)
    assert cmd[cmd.index("--attention-backend") + 1] == "torch_native"
    assert cmd[cmd.index("--device") + 1] == "cpu"
    assert cmd[-2:] == ["--max-total-tokens", "4096"]  # SGLang arguments pass through
    assert cmd.count("--incremental-streaming-output") == 1  # deltas, not the whole output in every event
    assert launch.env["SGLANG_PLATFORM"] == "m3serve_portable"
    assert launch.env["M3SERVE_M3_PLUGIN"] == "1"
    assert launch.env["SGLANG_OPT_USE_BF16_ROUTER_GEMM"] == "0"


def test_cuda_launch_uses_triton_and_the_import_shim(tiny_checkpoint):
    launch = build_launch(["--model-path", str(tiny_checkpoint), "--device", "cuda"], {"PYTHONPATH": "/x"})
    assert launch.command[launch.command.index("--attention-backend") + 1] == "triton"
    # Decode in CUDA graphs, prefill eager (the plugin's sparse path captures decode only).
    assert "--disable-cuda-graph" not in launch.command
    assert launch.command[launch.command.index("--cuda-graph-backend-prefill") + 1] == "disabled"
    off = build_launch(["--model-path", str(tiny_checkpoint), "--device", "cuda", "--disable-cuda-graph"], {})
    assert off.command.count("--disable-cuda-graph") == 1 and "--cuda-graph-backend-prefill" not in off.command
    first = launch.env["PYTHONPATH"].split(os.pathsep)[0]
    assert os.path.isfile(os.path.join(first, "sitecustomize.py"))


@pytest.mark.parametrize("argv, problem", [
    (["--page-size", "64"], "--page-size 64 contradicts M3"),
    (["--attention-backend", "flashinfer"], "--attention-backend flashinfer cannot run on cpu"),
    (["--kv-cache-dtype", "fp8_e4m3"], "fp8 KV caches need a GPU"),
    (["--enable-hisparse"], "HiSparse is not supported"),
    (["--tp", "0"], "--tp 0"),
])
def test_contradictory_settings_are_refused(tiny_checkpoint, argv, problem):
    with pytest.raises(WorkerConfigError, match=problem.replace("+", r"\+")):
        build_launch(["--model-path", str(tiny_checkpoint), "--device", "cpu", *argv], {})


def test_excluding_the_plugin_is_refused(tiny_checkpoint):
    with pytest.raises(WorkerConfigError, match="excludes m3serve_m3"):
        build_launch(["--model-path", str(tiny_checkpoint), "--device", "cpu"], {"SGLANG_PLUGINS": "other"})


def test_cli_refuses_page_size_with_clear_message(tiny_checkpoint):
    r = _worker_cli("--model-path", str(tiny_checkpoint), "--device", "cpu", "--page-size", "64")
    assert r.returncode == 2
    assert "--page-size 64 contradicts M3" in r.stderr and "128" in r.stderr


def test_cli_refuses_non_m3_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 256,
    }))
    r = _worker_cli("--model-path", str(tmp_path), "--device", "cpu")
    assert r.returncode == 2
    assert "cannot be served as MiniMax-M3" in r.stderr and "architectures" in r.stderr


def test_cli_refuses_inconsistent_m3_checkpoint(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    text = cfg["text_config"]
    text["index_n_heads"] = text["sparse_attention_config"]["sparse_num_index_heads"] = text["num_key_value_heads"] + 1
    (bad / "config.json").write_text(json.dumps(cfg))
    r = _worker_cli("--model-path", str(bad), "--device", "cpu")
    assert r.returncode == 2
    assert "index_n_heads" in r.stderr and "num_key_value_heads" in r.stderr


def test_cli_refuses_missing_checkpoint(tmp_path):
    r = _worker_cli("--model-path", str(tmp_path / "nope"), "--device", "cpu")
    assert r.returncode == 2 and "is not a directory" in r.stderr


def test_platform_is_inert_unless_selected(monkeypatch):
    from m3serve.platform import activate

    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    assert activate() is None
    monkeypatch.setenv("SGLANG_PLATFORM", "some_other_platform")
    assert activate() is None
    monkeypatch.setenv("SGLANG_PLATFORM", "m3serve_portable")
    monkeypatch.setenv("M3SERVE_DEVICE", "cpu")
    assert activate() == "m3serve.platform.cpu.PortableCpuPlatform"


def test_cpu_platform_is_out_of_tree():
    from m3serve.platform.cpu import PortableCpuPlatform

    p = PortableCpuPlatform()
    assert p.is_out_of_tree() and not p.is_cpu() and not p.is_cuda()
    assert p.get_default_attention_backend() == "torch_native"
    assert p.get_torch_distributed_backend_str() == "gloo"


def test_plugin_registers_nothing_unless_enabled(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    import m3serve.plugin as plugin

    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    monkeypatch.delenv("M3SERVE_M3_PLUGIN", raising=False)
    before = {k: list(v) for k, v in HookRegistry._hooks.items()}
    plugin.register()
    assert {k: list(v) for k, v in HookRegistry._hooks.items()} == before


def test_plugin_refuses_other_sglang_versions(monkeypatch, capsys):
    import sglang

    import m3serve.plugin as plugin
    from m3serve.plugin.version import UnsupportedSGLangError, check_sglang_version

    with pytest.raises(UnsupportedSGLangError, match=r"0\.5\.23.*'0\.5\.24'"):
        check_sglang_version("0.5.24")
    monkeypatch.setenv("M3SERVE_M3_PLUGIN", "1")
    monkeypatch.setattr(sglang, "__version__", "0.6.0")
    with pytest.raises(SystemExit):  # SystemExit: SGLang's loader swallows ordinary exceptions
        plugin.register()
    assert "FATAL" in capsys.readouterr().err


def test_sparse_backend_check_refuses_unsupported_setups():
    from m3serve.plugin.sparse_attention import UnsupportedSparseSetup, check_backend

    good = dict(page_size=128, block_size_k=128, init_blocks=0, local_blocks=1, score_type="max",
                sparse_layer_ids=[1, 2], disable_value_layer_ids=[1, 2], hisparse_coordinator=None,
                fp8_attn_gemm=False, index_cache_enabled=False, is_npu=False)
    check_backend(None, SimpleNamespace(**good))
    for change, needle in [({"page_size": 64}, "page size is 64"), ({"init_blocks": 1}, "sparse_init_block"),
                           ({"score_type": "lse"}, "sparse_score_type"),
                           ({"disable_value_layer_ids": [1]}, "index-value branch")]:
        with pytest.raises(UnsupportedSparseSetup, match=needle):
            check_backend(None, SimpleNamespace(**{**good, **change}))


def test_moe_layout_fix_matches_per_token_math_where_upstream_does_not():
    """The halves-layout expert loop equals a per-token computation; SGLang's native path (the bug) differs."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    from m3serve.plugin.moe_layout import fix_moe_layout, moe_halves_forward, swiglu_oai_halves

    g = torch.Generator().manual_seed(0)
    e, h, i, t, k = 4, 16, 8, 6, 2
    layer = SimpleNamespace(num_experts=e, w13_weight=torch.randn(e, 2 * i, h, generator=g),
                            w2_weight=torch.randn(e, h, i, generator=g))
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    cfg = MoeRunnerConfig(activation="silu", gemm1_alpha=1.702, gemm1_clamp_limit=7.0, gate_up_interleaved=False)
    topk = (weights, ids, None)

    want = torch.zeros(t, h)
    for n in range(t):
        for j in range(k):
            ex = int(ids[n, j])
            act = swiglu_oai_halves(layer.w13_weight[ex] @ x[n], 1.702, 7.0)
            want[n] += weights[n, j] * (layer.w2_weight[ex] @ act)
    got = moe_halves_forward(layer, x, topk, cfg)
    upstream = moe_forward_native(layer, x, topk, cfg)
    assert (got - want).abs().max() < 1e-4
    assert (upstream - want).abs().max() > 1e-2  # the bug the hook fixes

    interleaved = MoeRunnerConfig(activation="silu", gemm1_alpha=1.702, gemm1_clamp_limit=7.0)
    passthrough = fix_moe_layout(moe_forward_native, layer, x, topk, interleaved)
    assert torch.equal(passthrough, moe_forward_native(layer, x, topk, interleaved))


def test_serve_refuses_a_non_m3_checkpoint_before_starting_anything(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    r = subprocess.run([sys.executable, "-m", "m3serve.cli", "serve", "--model-path", str(tmp_path), "--device", "cpu",
                        "--no-gateway"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "cannot be served as MiniMax-M3" in r.stderr
    assert "starting worker" not in r.stdout


def test_serve_writes_the_tiny_model_once(tmp_path):
    from m3serve.serving.serve import tiny_model_path

    first = tiny_model_path(str(tmp_path))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path(str(tmp_path)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch folder left behind


def test_cpu_tensor_parallel_gets_one_core_group_per_rank(tiny_checkpoint):
    from m3serve.serving.worker import cpu_rank_binding

    assert cpu_rank_binding(2, [0, 1, 2, 3]) == "0,1|2,3"
    assert cpu_rank_binding(2, [1, 0]) == "0|1"
    assert cpu_rank_binding(3, [0, 1]) == "0|1|0"  # more ranks than cores: shared round-robin
    launch = build_launch(["--model-path", str(tiny_checkpoint), "--device", "cpu", "--tp", "2"], {})
    assert len(launch.env["SGLANG_CPU_OMP_THREADS_BIND"].split("|")) == 2
    assert launch.command[launch.command.index("--tp-size") + 1] == "2"
