"""CPU checks of the end-to-end GPU benchmark's scripts (benchmarks/agentic/gpu/, scripts/prepare_gpu_e2e_bundle.sh).

No GPU and no network: the model writer, the per-arm command lines and environments, the arm plugin and
its entry point, the result parsing and table, the bundle script's package list, and the device-side
setup script on a fake bundle.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_DIR = REPO / "benchmarks" / "agentic" / "gpu"
sys.path.insert(0, str(GPU_DIR))

import e2e_arm_plugin  # noqa: E402
import run_e2e  # noqa: E402
import slice_model  # noqa: E402

pytest.importorskip("tokenizers")


# ------------------------------------------------------------------------------------------- the model

def test_slice_config_has_m3_attention_shapes(tmp_path):
    path = slice_model.write_slice_model(tmp_path / "m", "sparse")
    cfg = json.loads((path / "config.json").read_text())
    text = cfg["text_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == (
        6144, 64, 4, 128)
    assert text["rotary_dim"] == 64
    sparse = text["sparse_attention_config"]
    assert (sparse["sparse_num_index_heads"], sparse["sparse_index_dim"]) == (4, 128)
    assert (sparse["sparse_block_size"], sparse["sparse_topk_blocks"], sparse["sparse_local_block"]) == (128, 16, 1)
    assert sparse["sparse_score_type"] == "max" and sparse["sparse_init_block"] == 0
    assert sparse["sparse_attention_freq"] == [0] + [1] * 7
    assert text["num_local_experts"] == 16 and text["num_experts_per_tok"] == 4
    assert text["dense_intermediate_size"] == 12288 and text["intermediate_size"] == 3072
    assert text["vocab_size"] <= 1024  # the tiny tokenizer's vocabulary: no 2.5 GB embedding
    # config + tokenizer only: weights come from --load-format dummy.
    assert not list(path.glob("*.safetensors"))
    assert (path / "tokenizer.json").is_file() and (path / "chat_template.jinja").is_file()
    meta = json.loads((path / "m3serve_slice.json").read_text())
    assert 7e9 < meta["param_estimate"] < 9e9  # ~16 GB bf16: fits an H100 with room for the KV cache


def test_dense_variant_keeps_shapes_but_no_sparse_layers(tmp_path):
    from m3serve.config import load_m3_config

    sparse = json.loads((slice_model.write_slice_model(tmp_path / "s", "sparse") / "config.json").read_text())
    dense_dir = slice_model.write_slice_model(tmp_path / "d", "dense")
    dense = json.loads((dense_dir / "config.json").read_text())
    st, dt_ = sparse["text_config"], dense["text_config"]
    assert dt_["sparse_attention_config"]["sparse_attention_freq"] == [0] * 8
    assert dt_["mlp_layer_types"] == st["mlp_layer_types"]  # same MoE layers
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts"):
        assert dt_[key] == st[key]
    settings = load_m3_config(dense_dir)  # the worker's checkpoint validation accepts it
    assert settings.text.sparse_layer_ids == [] and settings.text.dense_layer_ids == list(range(8))
    assert settings.text.moe_layer_ids == list(range(1, 8))


def test_same_tokenizer_for_every_variant(tmp_path):
    a = slice_model.write_slice_model(tmp_path / "a", "sparse")
    b = slice_model.write_slice_model(tmp_path / "b", "dense")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_bad_variant_refused():
    with pytest.raises(ValueError, match="variant"):
        slice_model.slice_config(slice_model.TINY_SIZES, "medium")


# ------------------------------------------------------------------------------------------- commands

@pytest.mark.parametrize("shape", sorted(run_e2e.SHAPES))
def test_kv_pool_holds_the_whole_run(shape):
    s = run_e2e.SHAPES[shape]
    assert s.kv_tokens_needed() < s.max_total_tokens


def test_full_shape_is_agentic_60k_c8():
    s = run_e2e.SHAPES["full"]
    assert (s.prefix_tokens, s.concurrency, s.user_tokens, s.tool_result_tokens, s.output_tokens) == (
        60_000, 8, 1_024, 1_536, 256)


def test_server_flags_same_for_every_arm_and_graphs_off():
    flags = run_e2e.server_flags(run_e2e.SHAPES["full"], "cuda")
    assert flags[flags.index("--load-format") + 1] == "dummy"
    assert "--disable-cuda-graph" in flags and "--enable-cache-report" in flags
    assert flags[flags.index("--mem-fraction-static") + 1] == "0.85"
    assert int(flags[flags.index("--context-length") + 1]) >= run_e2e.SHAPES["full"].kv_tokens_needed()
    assert "--mem-fraction-static" not in run_e2e.server_flags(run_e2e.SHAPES["dry"], "cpu")


@pytest.fixture
def launches(tmp_path, monkeypatch):
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    models = {v: slice_model.write_slice_model(tmp_path / v, v, slice_model.TINY_SIZES) for v in ("sparse", "dense")}
    site = run_e2e.write_arm_dist(tmp_path / "site")
    flags = run_e2e.server_flags(run_e2e.SHAPES["quick"], "cuda")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": "/bundle/site"}
    return {arm: run_e2e.worker_launch(arm, models[run_e2e.MODEL_VARIANT[arm]], 31000 + i, "cuda", flags, env,
                                       tmp_path / f"markers_{arm}", site)
            for i, arm in enumerate(run_e2e.ARMS)}


def test_worker_commands_differ_only_in_model_and_port(launches):
    def normalise(cmd):
        out = list(cmd)
        out[out.index("--model-path") + 1] = "M"
        out[out.index("--port") + 1] = "P"
        return out

    cmds = {arm: normalise(launch.command) for arm, launch in launches.items()}
    assert cmds["ours"] == cmds["upstream"] == cmds["dense"]
    cmd = launches["ours"].command
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[cmd.index("--page-size") + 1] == "128" and cmd[cmd.index("--device") + 1] == "cuda"
    assert cmd.count("--disable-cuda-graph") == 1
    assert launches["dense"].model_path.endswith("dense")


def test_arm_environments(launches):
    ours, up, dense = launches["ours"].env, launches["upstream"].env, launches["dense"].env
    for env in (ours, up, dense):
        assert env["SGLANG_PLATFORM"] == "m3serve_portable" and env["M3SERVE_DEVICE"] == "cuda"
        parts = env["PYTHONPATH"].split(os.pathsep)
        assert parts[-1] == "/bundle/site" and any(p.endswith("cuda_site") for p in parts)
        assert str(GPU_DIR) in parts
    # ours / dense: m3serve's plugin (no allow-list); upstream: only the platform + the arm plugin.
    assert "SGLANG_PLUGINS" not in ours and "SGLANG_PLUGINS" not in dense
    assert "M3SERVE_SPARSE_BACKEND" not in ours
    assert up["SGLANG_PLUGINS"] == "m3serve_portable,m3serve_upstream_arm"
    assert up["M3SERVE_SPARSE_BACKEND"] == "upstream"


def test_arm_dist_registers_the_plugin(tmp_path):
    site = run_e2e.write_arm_dist(tmp_path / "site")
    eps = [ep for d in importlib.metadata.distributions(path=[str(site)]) for ep in d.entry_points]
    assert [(ep.group, ep.name, ep.value) for ep in eps] == [
        ("sglang.srt.plugins", e2e_arm_plugin.ENTRY_POINT, "e2e_arm_plugin:register")]


def test_arm_plugin_is_inert_without_switch(monkeypatch):
    monkeypatch.delenv(e2e_arm_plugin.SWITCH_ENV, raising=False)
    assert not e2e_arm_plugin.enabled()
    e2e_arm_plugin.register()  # no-op, no sglang import needed
    monkeypatch.setenv(e2e_arm_plugin.SWITCH_ENV, "upstream")
    assert e2e_arm_plugin.enabled()


def test_arm_plugin_installs_only_the_enabling_hooks():
    from m3serve import plugin

    targets = {t for t, _, _ in e2e_arm_plugin.hooks()}
    ours = {t: kind for t, _, kind in plugin.hooks()}
    assert targets < set(ours)
    assert not any("MiniMaxSparseAttnBackend" in t for t in targets)  # upstream computes the sparse layers


def test_bench_commands(tmp_path):
    shape = run_e2e.SHAPES["full"]
    cmd = run_e2e.bench_command("http://h:1/v1", tmp_path, shape, tmp_path / "o.json", 300)
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert cmd[1:3] == ["-m", "m3bench.cli"]
    assert args["--prefix-tokens"] == "60000" and args["--concurrency"] == "8" and args["--turns"] == "3"
    assert args["--output-tokens"] == "256" and args["--tokenizer"] == str(tmp_path)
    assert "--output-details" in cmd
    warm = run_e2e.bench_command("http://h:1/v1", tmp_path, shape, tmp_path / "w.json", 300, warmup_pass=True)
    wargs = dict(zip(warm[3::2], warm[4::2]))
    assert wargs["--turns"] == "1" and wargs["--seed"] != args["--seed"]  # other sessions, same prefix
    assert wargs["--prefix-tokens"] == "60000"


def test_bench_cli_accepts_the_command(tmp_path):
    from m3bench.cli import _check_args, build_parser

    cmd = run_e2e.bench_command("http://h:1/v1", tmp_path, run_e2e.SHAPES["quick"], tmp_path / "o.json", 100)
    parser = build_parser()
    args = parser.parse_args(cmd[3:])
    spec = _check_args(parser, args)
    assert spec.prefix_tokens == 8000 and args.concurrency == [8]


def test_arg_parsing():
    a = run_e2e.parse_args(["--out", "/tmp/x/out", "--arms", "ours,dense", "--shape", "quick"])
    assert a.arms == ["ours", "dense"] and a.work == "/tmp/x/e2e_work"
    with pytest.raises(SystemExit):
        run_e2e.parse_args(["--out", "/tmp/x", "--arms", "ours,flash"])


# ------------------------------------------------------------------------------------------- results

LOG = """\
[2026-11-26 10:00:01] Decode batch, #running-req: 8, #token: 70000, gen throughput (token/s): 410.5, #queue-req: 0
[2026-11-26 10:00:02] Decode batch, #running-req: 0, #token: 0, gen throughput (token/s): 0.00, #queue-req: 0
[2026-11-26 10:00:03] Decode batch, #running-req: 8, #token: 70100, gen throughput (token/s): 400.0, #queue-req: 0
Triton kernel '_topk_index_partial_kernel' took 3.9 s to compile after serving started
[m3serve] M3 sparse decode ran msa_kernels.ops.index_topk + sparse_attention
Traceback (most recent call last):
"""


def test_server_log_stats():
    s = run_e2e.server_log_stats(LOG)
    assert s["triton_compiles_logged"] == 1 and s["triton_compile_s"] == 3.9
    assert s["gen_throughput_lines"] == 3 and s["gen_throughput_median"] == 410.5 and s["gen_throughput_max"] == 410.5
    assert s["tracebacks"] == 1 and len(s["m3serve_lines"]) == 1


def _bench_json(out_tps: float) -> dict:
    dist = {"mean": 1.0, "std": 0.0, "p50": 10.0, "p90": 20.0, "p99": 30.0, "max": 40.0}
    return {"points": [{"summary": {
        "completed": 16, "failed": 0, "output_throughput": out_tps, "request_throughput": 0.5,
        "total_throughput": 9000.0, "ttft_ms": dist, "tpot_ms": dist, "itl_ms": {**dist, "p95": 25.0},
        "e2e_latency_ms": dist, "cached_token_ratio": 0.9, "duration_s": 30.0}}]}


def test_table_ratio_against_upstream():
    rows = [run_e2e.summary_row(run_e2e.ArmResult("ours", "ok", bench=_bench_json(300.0))),
            run_e2e.summary_row(run_e2e.ArmResult("upstream", "ok", bench=_bench_json(150.0))),
            run_e2e.summary_row(run_e2e.ArmResult("dense", "failed", reason="boom"))]
    table = run_e2e.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 5 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| ours | ok | 16/0 | 300.0 | 2.00x |" in table
    assert "| upstream | ok | 16/0 | 150.0 | 1.00x |" in table
    assert lines[-1].startswith("| dense | failed |")
    assert "90.0%" in table


def test_write_outputs_at_most_three_files(tmp_path):
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "ours_worker.log").write_text(LOG)
    report = {"shape_name": "quick", "shape": {}, "server_flags": ["--x"], "date": "d",
              "environment": {"card": "NVIDIA H100 80GB HBM3", "device": "cuda"},
              "arms": {"ours": run_e2e.asdict(run_e2e.ArmResult("ours", "ok", bench=_bench_json(1.0)))}}
    js, md = run_e2e.write_outputs(tmp_path / "out", work, report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["logs.tar.gz", "summary.json", "summary.md"]
    assert json.loads(js.read_text())["table_rows"][0]["output_tok_s"] == 1.0
    assert "H100" in md.read_text()
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        assert tar.getnames() == ["ours_worker.log"]


@pytest.mark.parametrize("info,slug", [({"card": "NVIDIA H100 80GB HBM3"}, "h100"), ({"card": "NVIDIA H200"}, "h200"),
                                       ({"device": "cpu"}, "cpu")])
def test_card_slug(info, slug):
    assert run_e2e.card_slug(info) == slug


# ------------------------------------------------------------------------------------------- bundle + setup

BUNDLE_SCRIPT = REPO / "scripts" / "prepare_gpu_e2e_bundle.sh"


def test_bundle_script_syntax_and_package_list():
    subprocess.run(["bash", "-n", str(BUNDLE_SCRIPT)], check=True)
    text = BUNDLE_SCRIPT.read_text()
    block = re.search(r"WHEELS=\((.*?)\)", text, re.S).group(1)
    reqs = block.split()
    assert len(reqs) == 31  # research/sglang_gpu_feasibility.md section 4
    names = [r.split("==")[0].lower().replace("_", "-") for r in reqs]
    assert len(set(names)) == len(names) and all("==" in r for r in reqs)
    assert "transformers==5.19.0" in reqs  # sglang 0.5.23 pins it; the image has 5.17
    assert ".baseline/e2e" in text and "--python-version 3.12" in text


def test_bundle_paths_are_ignored():
    out = subprocess.run(["git", "check-ignore", ".baseline/e2e/x", ".baseline/e2e_cache/y"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0 and len(out.stdout.split()) == 2


def _fake_wheel(folder: Path, name: str) -> Path:
    path = folder / f"{name}-0.1-py3-none-any.whl"
    di = f"{name}-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 1\n")
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{di}/RECORD", "")
    return path


def test_setup_site_on_a_fake_bundle(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    _fake_wheel(bundle / "wheels", "fakepkg_one")
    _fake_wheel(bundle / "wheels", "fakepkg_two")
    src = tmp_path / "src" / "sglang"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("__version__ = '0.5.23'\n")
    subprocess.run(["tar", "-cJf", str(bundle / "sglang_stripped.tar.xz"), "-C", str(tmp_path / "src"), "sglang"],
                   check=True)
    (bundle / "dist" / "m3serve-0.1.0.dist-info").mkdir(parents=True)
    (bundle / "dist" / "m3serve-0.1.0.dist-info" / "entry_points.txt").write_text("[x]\n")
    (bundle / "stubs").mkdir()
    site = tmp_path / "site"
    env = {**os.environ, "E2E_BUNDLE": str(bundle), "E2E_SITE": str(site), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(GPU_DIR / "setup_site.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("export PYTHONPATH=")
    parts = line.split("=", 1)[1].split(":")
    assert parts[0] == str(site) and parts[-1] == str(bundle / "stubs")
    assert parts[1:4] == [str(REPO / "python"), str(REPO / "kernels"), str(REPO / "benchmarks")]
    for rel in ("fakepkg_one/__init__.py", "fakepkg_two/__init__.py", "sglang/__init__.py",
                "m3serve-0.1.0.dist-info/entry_points.txt"):
        assert (site / rel).is_file(), rel


def test_setup_site_without_bundle_fails(tmp_path):
    env = {**os.environ, "E2E_BUNDLE": str(tmp_path / "none"), "E2E_SITE": str(tmp_path / "s")}
    out = subprocess.run(["bash", str(GPU_DIR / "setup_site.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "no bundle" in out.stderr


def test_gateway_never_evicts_the_only_worker():
    from m3serve.gateway import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--worker-urls", "http://w:1", *run_e2e.GATEWAY_ARGS]))
    assert cfg["health_failure_threshold"] >= 1000 and cfg["health_interval_secs"] >= 30
    assert cfg["served_model_name"] == "m3-slice"


def test_warmup_twin_has_the_measured_lengths(tmp_path):
    shape = run_e2e.SHAPES["full"]
    bench = run_e2e.bench_command("http://h:1/v1", tmp_path, shape, tmp_path / "o.json", 300)
    twin = run_e2e.bench_command("http://h:1/v1", tmp_path, shape, tmp_path / "w.json", 300, warmup_pass=True,
                                 warmup_turns=shape.turns)
    a, b = dict(zip(bench[3::2], bench[4::2])), dict(zip(twin[3::2], twin[4::2]))
    for key in ("--prefix-tokens", "--user-tokens", "--tool-result-tokens", "--turns", "--output-tokens",
                "--concurrency"):
        assert a[key] == b[key], key
    assert a["--seed"] != b["--seed"]


def test_warmup_turns_parsing():
    assert run_e2e.parse_args(["--out", "/tmp/x", "--warmup-turns", "same"]).warmup_turns == "same"
    with pytest.raises(SystemExit):
        run_e2e.parse_args(["--out", "/tmp/x", "--warmup-turns", "0"])


# ------------------------------------------------------------------------------------------- graphs, sweep, repeats

@pytest.mark.parametrize("c,bs", [(1, 8), (2, 8), (8, 8), (9, 16), (16, 16), (17, 32)])
def test_graph_max_bs(c, bs):
    assert run_e2e.graph_max_bs(c) == bs


def test_server_flags_with_and_without_graphs():
    full = run_e2e.SHAPES["full"]
    eager = run_e2e.server_flags(full, "cuda")
    graphs = run_e2e.server_flags(full, "cuda", max_concurrency=16, cuda_graph=True)
    assert "--disable-cuda-graph" in eager and not any(f.startswith("--cuda-graph") for f in eager)
    assert "--disable-cuda-graph" not in graphs
    assert graphs[graphs.index("--cuda-graph-max-bs-decode") + 1] == "16"
    assert graphs[graphs.index("--cuda-graph-backend-prefill") + 1] == "disabled"  # decode graphs only
    assert run_e2e.server_flags(full, "cuda", cuda_graph=True)[
        run_e2e.server_flags(full, "cuda", cuda_graph=True).index("--cuda-graph-max-bs-decode") + 1] == "8"
    # Everything else the same (the context length holds one request of the shape, whatever the sweep).
    def strip(flags):
        out, skip = [], False
        for f in flags:
            if skip:
                skip = False
            elif f.startswith("--cuda-graph"):
                skip = True
            elif f not in ("--disable-cuda-graph", "--max-running-requests"):
                out.append(f)
        return out
    assert strip(eager)[:2] == strip(graphs)[:2]
    assert eager[eager.index("--context-length") + 1] == graphs[graphs.index("--context-length") + 1]


def test_sweep_sizes_pool_and_running_requests_for_the_top_level():
    quick = run_e2e.SHAPES["quick"]
    flags = run_e2e.server_flags(quick, "cuda", max_concurrency=64)
    assert int(flags[flags.index("--max-total-tokens") + 1]) >= run_e2e.replace(quick, concurrency=64).kv_tokens_needed()
    assert int(flags[flags.index("--max-running-requests") + 1]) >= 64
    base = run_e2e.server_flags(quick, "cuda")
    assert base[base.index("--max-total-tokens") + 1] == str(quick.max_total_tokens)  # unchanged without a sweep
    assert base[base.index("--context-length") + 1] == flags[flags.index("--context-length") + 1]


def test_sglang_accepts_the_graph_flags():
    pytest.importorskip("sglang")
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    flags = run_e2e.server_flags(run_e2e.SHAPES["full"], "cuda", max_concurrency=16, cuda_graph=True)
    ns = parser.parse_args(["--model-path", "m", *flags])
    assert ns.cuda_graph_max_bs_decode == 16
    with pytest.raises(SystemExit):  # why the flag is spelled -decode: the bare one is ambiguous in 0.5.23
        parser.parse_args(["--model-path", "m", "--cuda-graph-max-bs", "16"])


CAPTURE_OK = """\
[2026-11-26 10:00:01] Capture target decode CUDA graph begin. backend=full, num_tokens_per_req=1, avail mem=30.1 GB
[2026-11-26 10:00:13] Capture target decode CUDA graph end. elapsed=12.30 s, mem usage=0.80 GB, avail mem=29.3 GB.
"""
CAPTURE_OLD = "Capture cuda graph begin. This can take up to several minutes.\nCapture cuda graph end. Time elapsed: 3.5 s.\n"
CAPTURE_CRASH = """\
Capture target decode CUDA graph begin. backend=full
Traceback (most recent call last):
  File "x.py", line 1, in <module>
    run()
RuntimeError: CUDA error: operation not permitted when stream is capturing
"""
CAPTURE_RAISED = "Capture target decode CUDA graph begin.\nException: Capture cuda graph failed: out of memory\nPossible\n"


@pytest.mark.parametrize("log,requested,state", [
    (CAPTURE_OK, True, "on"), (CAPTURE_OLD, True, "on"), (CAPTURE_OK, False, "off"), ("", False, "off"),
    (CAPTURE_CRASH, True, "failed: capture began but did not end (RuntimeError: CUDA error: operation not permitted"),
    (CAPTURE_RAISED, True, "failed: out of memory"),
    ("Decode batch ...\n", True, "failed: no decode"),
])
def test_cuda_graph_log_status(log, requested, state):
    got, info = run_e2e.cuda_graph_log_status(log, requested)
    assert got.startswith(state), got
    if log is CAPTURE_OK:
        assert info["capture_s"] == 12.3 and info["captured"] == ["target decode"]


def test_arg_parsing_graphs_sweep_repeats():
    a = run_e2e.parse_args(["--out", "/tmp/x", "--cuda-graph-arms", "all", "--graph-fallback",
                            "--concurrency", "1,4,8,16", "--repeats", "3"])
    assert a.cuda_graph_arms == list(run_e2e.ARMS) and a.graph_fallback and a.repeats == 3
    assert a.concurrency == [1, 4, 8, 16]
    d = run_e2e.parse_args(["--out", "/tmp/x"])
    assert d.cuda_graph_arms == [] and not d.graph_fallback and d.repeats == 1 and d.concurrency is None
    assert run_e2e.parse_args(["--out", "/tmp/x", "--cuda-graph-arms", "ours,upstream"]).cuda_graph_arms == [
        "ours", "upstream"]
    for bad in (["--cuda-graph-arms", "flash"], ["--concurrency", "0,4"], ["--concurrency", "a"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            run_e2e.parse_args(["--out", "/tmp/x", *bad])


def test_run_levels_headline_first():
    full = run_e2e.SHAPES["full"]
    assert run_e2e.run_levels(full, None) == [8]
    assert run_e2e.run_levels(full, [1, 4, 8, 16]) == [8, 1, 4, 16]
    assert run_e2e.run_levels(full, [16, 1, 16]) == [8, 16, 1]


class FakeDeadline:
    """A budget that each fake run spends."""

    def __init__(self, seconds):
        self.t = seconds

    def left(self):
        return self.t


def _fake_runner(deadline, seconds_at):
    calls = []

    def run_one(c, rep, seed, timeout_s):
        calls.append((c, rep, seed, round(timeout_s)))
        s = seconds_at(c)
        deadline.t -= s
        return {"status": "ok", "bench_s": s, "summary": {"output_throughput": 100.0 * c + rep}}
    return run_one, calls


def test_measure_plan_skips_levels_when_the_budget_runs_out():
    deadline = FakeDeadline(190.0)
    run_one, calls = _fake_runner(deadline, lambda c: 30.0 + 2 * c)  # c8: 46 s, c1: 32 s, c16: 62 s
    plan = [(8, 0, 0), (8, 1, 1), (1, 0, 0), (16, 0, 0), (4, 0, 0)]
    runs = run_e2e.measure_plan(plan, run_one, deadline)
    # 190 -> c8 (144 left) -> c8 again (needs 46+10; 98 left) -> c1 (needs 46+10; takes 32: 66 left)
    # -> c16 needs 46*sqrt(2)+10 = 75 > 66: skipped -> c4 (needs 46+10 = 56 <= 66): runs.
    assert [r["status"] for r in runs] == ["ok", "ok", "ok", "skipped", "ok"]
    assert [c for c, *_ in calls] == [8, 8, 1, 4]
    skipped = runs[3]
    assert skipped["concurrency"] == 16 and skipped["reason"].startswith("budget:") and "needs ~75 s" in skipped["reason"]
    assert calls[0][3] == 175  # the headline gets the whole budget less 15 s


def test_measure_plan_keeps_time_for_later_arms():
    deadline = FakeDeadline(300.0)
    run_one, calls = _fake_runner(deadline, lambda c: 40.0)
    runs = run_e2e.measure_plan([(8, 0, 0), (1, 0, 0), (16, 0, 0)], run_one, deadline, later_arms=2,
                                arm_overhead_s=50.0)
    # after the headline: 260 left, reserve 2 * (50 + 40 + 10) = 200; c1 needs 50 > 60? no: 60 >= 50 -> runs
    assert [r["status"] for r in runs] == ["ok", "ok", "skipped"]
    assert "kept for 2 later arm(s)" in runs[2]["reason"]
    assert calls[1][3] == 260 - 200 - 5  # a sweep run's timeout keeps the reserve


def test_measure_plan_headline_always_runs():
    deadline = FakeDeadline(5.0)
    run_one, calls = _fake_runner(deadline, lambda c: 1.0)
    runs = run_e2e.measure_plan([(8, 0, 0), (1, 0, 0)], run_one, deadline)
    assert [r["status"] for r in runs] == ["ok", "skipped"] and calls[0][3] == 10  # at least 10 s


def _summary(out_tps, ttft=100.0, tpot=40.0):
    return _bench_json(out_tps)["points"][0]["summary"] | {"ttft_ms": {"p50": ttft, "p90": ttft, "p99": ttft, "max": ttft},
                                                           "tpot_ms": {"p50": tpot, "p90": tpot, "p99": tpot, "max": tpot}}


def _sweep_report():
    def runs(scale):
        return [{"concurrency": 8, "repeat": r, "seed": r, "status": "ok", "bench_s": 40.0,
                 "summary": _summary(scale * v)} for r, v in enumerate((170.0, 180.0, 175.0))] + [
            {"concurrency": 1, "repeat": 0, "seed": 0, "status": "ok", "bench_s": 30.0, "summary": _summary(scale * 30.0)},
            {"concurrency": 16, "repeat": 0, "seed": 0, "status": "skipped", "reason": "budget: 20 s left"}]
    arms = {}
    for arm, scale, mode in (("ours", 2.0, "cuda-graph"), ("upstream", 1.0, "eager")):
        res = run_e2e.ArmResult(arm, "ok", bench=_bench_json(175.0 * scale), measured_mode=mode, runs=runs(scale))
        res.repeats = run_e2e.repeat_stats([r for r in res.runs if r["concurrency"] == 8])
        arms[arm] = run_e2e.asdict(res)
    return {"shape_name": "full", "shape": run_e2e.asdict(run_e2e.SHAPES["full"]), "server_flags": ["--x"],
            "date": "d", "environment": {"card": "NVIDIA H100 80GB HBM3", "device": "cuda"},
            "concurrency_levels": [8, 1, 16], "repeats": 3, "arms": arms}


def test_sweep_points_median_run_and_tables():
    report = _sweep_report()
    pts = run_e2e.sweep_points(report)
    by = {(p["arm"], p["concurrency"]): p for p in pts}
    assert by[("ours", 8)]["output_tok_s"] == 350.0 and by[("ours", 8)]["runs"] == 3  # median of 340/360/350
    assert by[("upstream", 1)]["output_tok_s"] == 30.0
    assert by[("ours", 16)]["status"] == "skipped" and "output_tok_s" not in by[("ours", 16)]
    table = run_e2e.format_sweep(pts)
    assert "| 8 | ours | ok | 16/0 | 350.0 | 2.00x |" in table
    assert "| 16 | ours | skipped (budget: 20 s left) |" in table
    assert "| 1 | 60.0 | 30.0 | 2.00x |" in table  # the pivot: c, ours, upstream, ratio
    st = report["arms"]["ours"]["repeats"]
    assert (st["n"], st["median"], st["min"], st["max"]) == (3, 350.0, 340.0, 360.0)
    rows = [run_e2e.summary_row(run_e2e.ArmResult(**r)) for r in report["arms"].values()]
    rep = run_e2e.format_repeats(rows)
    assert "| ours | 3/3 | 350.0 | 340.0 | 360.0 | 5.7% |" in rep


def test_write_outputs_with_sweep(tmp_path):
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    (work / "bench" / "ours_c8_r0.json").write_text("{}")
    js, md = run_e2e.write_outputs(tmp_path / "out", work, _sweep_report())
    text = md.read_text()
    assert "concurrency sweep (8, 1, 16" in text and "median run of 3" in text and "c=16 run 0: skipped" in text
    assert len(json.loads(js.read_text())["sweep_rows"]) == 6
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        assert tar.getnames() == ["bench/ours_c8_r0.json"]


def test_old_results_still_load():
    """A result from before the sweep (no runs): one point per arm at the shape's concurrency."""
    old = json.loads((REPO / "benchmarks" / "results" / "agentic_e2e_h100_full.json").read_text())
    pts = run_e2e.sweep_points(old)
    assert {(p["arm"], p["concurrency"]) for p in pts} == {("ours", 8), ("upstream", 8), ("dense", 8)}


PLOT_SCRIPT = REPO / "benchmarks" / "agentic" / "plot_e2e.py"


def test_plot_script_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "r.json"
    results.write_text(json.dumps(_sweep_report()))
    out = subprocess.run([sys.executable, str(PLOT_SCRIPT), str(results), str(tmp_path / "plots" / "e2e")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("e2e_throughput.png", "e2e_latency.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ------------------------------------------------------------------------------------------- the CPU dry run

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_dry_run_with_a_two_level_sweep(tmp_path):
    """The whole pipeline on the CPU (tiny model, dry shape): one arm, concurrency 2 (headline) and 1."""
    pytest.importorskip("sglang")
    out = tmp_path / "out"
    cmd = [sys.executable, str(GPU_DIR / "run_e2e.py"), "--device", "cpu", "--tiny", "--shape", "dry",
           "--arms", "ours", "--concurrency", "1,2", "--budget-s", "600", "--out", str(out),
           "--work", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=800, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "summary.json").read_text())
    ours = report["arms"]["ours"]
    assert ours["status"] == "ok" and ours["cuda_graph"] == "off" and ours["measured_mode"] == "eager"
    assert [(r["concurrency"], r["status"]) for r in ours["runs"]] == [(2, "ok"), (1, "ok")]
    assert report["concurrency_levels"] == [2, 1]
    assert {(p["concurrency"], p["status"]) for p in report["sweep_rows"]} == {(1, "ok"), (2, "ok")}
    assert "concurrency sweep" in (out / "summary.md").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"bench/ours_c2_r0.json", "bench/ours_c1_r0.json"} <= set(tar.getnames())
    if importlib.util.find_spec("matplotlib"):
        subprocess.run([sys.executable, str(PLOT_SCRIPT), str(out / "summary.json"), str(tmp_path / "p")], check=True,
                       timeout=120)
        assert (tmp_path / "p_throughput.png").is_file()


def _bring_up(fail_times, graphs=True, fallback=True, state="failed: out of memory"):
    res = run_e2e.ArmResult("ours", cuda_graph_requested=graphs)
    calls = []

    def up():
        calls.append("up")
        if calls.count("up") <= fail_times:
            raise RuntimeError("worker-ours exited with code 1")

    mode = run_e2e.bring_up(res, graphs, up, lambda: calls.append("restart"), lambda: state, fallback)
    return res, mode, calls


def test_graph_fallback_restarts_eager_once():
    res, graphs, calls = _bring_up(1)
    assert graphs is False and calls == ["up", "restart", "up"] and res.graph_fallback == "failed: out of memory"
    res.measured_mode = "eager"
    run_e2e.finish_graph_fields(res, CAPTURE_RAISED)
    assert res.cuda_graph == "failed: out of memory; eager fallback measured"
    assert run_e2e.summary_row(res)["mode"] == "eager (graph fallback)"
    # no capture state in the log: the start error is the reason
    res, _, _ = _bring_up(1, state="failed: no decode 'Capture ... CUDA graph end' line")
    assert res.graph_fallback.startswith("graph start failed: RuntimeError: worker-ours exited")


def test_graph_fallback_only_once_and_only_when_asked():
    with pytest.raises(RuntimeError):  # the eager restart fails too: the arm fails
        _bring_up(2)
    with pytest.raises(RuntimeError):
        _bring_up(1, fallback=False)
    with pytest.raises(RuntimeError):
        _bring_up(1, fallback=lambda: False)  # asked at failure time (no budget left)
    with pytest.raises(RuntimeError):  # an eager worker that fails is not retried
        _bring_up(1, graphs=False)
    res, graphs, calls = _bring_up(0)
    assert graphs is True and calls == ["up"] and res.graph_fallback is None


@pytest.mark.parametrize("log,mode,state,measured", [
    (CAPTURE_OK, "cuda-graph", "on", "cuda-graph"),
    ("", "cuda-graph", "failed: no decode", "cuda-graph (unconfirmed)"),
    ("", "eager", "off", "eager"),
])
def test_finish_graph_fields(log, mode, state, measured):
    res = run_e2e.ArmResult("ours", cuda_graph_requested=mode == "cuda-graph", measured_mode=mode)
    run_e2e.finish_graph_fields(res, log)
    assert res.cuda_graph.startswith(state) and res.measured_mode == measured


def test_repeats_table_survives_an_arm_with_no_ok_run():
    # An arm whose repeats all failed (seen on the H100: the bench timed out) must not crash the report.
    rows = [{"arm": "dense", "repeats": {"n": 0, "planned": 3}},
            {"arm": "ours", "repeats": {"n": 2, "planned": 3, "median": 600.0, "min": 500.0, "max": 700.0}}]
    table = run_e2e.format_repeats(rows)
    assert "| dense | 0/3 | - |" in table and "| ours | 2/3 | 600.0 |" in table
