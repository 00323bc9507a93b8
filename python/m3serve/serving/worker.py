"""`m3serve worker`: one SGLang server for an M3 checkpoint, with the settings M3 needs.

    m3serve worker --model-path PATH [--tp N] [--device cpu|cuda] [any SGLang server argument]

What it adds to SGLang's own launcher:
  * validates the checkpoint first (m3serve.config) and refuses settings that contradict M3's
    requirements, with a message naming the setting;
  * page size 128 (one KV page = one MSA block), our M3 plugin, and the portable platform with the
    attention backend that fits the device (torch_native on CPU, triton on CUDA; the dense layers use
    it, the sparse layers go to msa_kernels through the plugin).
Everything else on the command line is passed to SGLang unchanged. The process then *becomes* the
SGLang server (exec), so signals and exit codes are SGLang's own.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from m3serve.platform.env import DEVICES, PLATFORM_NAME, env_defaults

PAGE_SIZE = 128
PLUGIN_NAME = "m3serve_m3"
ATTENTION_BACKENDS = {"cpu": ("torch_native",), "cuda": ("triton", "torch_native")}
CUDA_SITE = Path(__file__).resolve().parent.parent / "platform" / "cuda_site"

# SGLang options that contradict how m3serve serves M3, and why.
_REFUSED_FLAGS = {
    "--enable-hisparse": "HiSparse is not supported by m3serve's sparse-attention path",
    "--disable-radix-cache": None,  # allowed: listed so the parser keeps it in the pass-through args
}


class WorkerConfigError(ValueError):
    """The worker's command line or checkpoint cannot be served; the message says what and why."""


@dataclass
class WorkerLaunch:
    """The command and environment of one SGLang worker process."""

    command: list[str]
    env: dict[str, str]
    model_path: str
    host: str
    port: int
    device: str
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="m3serve worker",
        description="Start one SGLang worker serving an M3 checkpoint (other arguments go to SGLang).",
    )
    p.add_argument("--model-path", required=True, help="M3 checkpoint directory (config.json, weights, tokenizer)")
    p.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="cpu or cuda (default: M3SERVE_DEVICE, else cuda when a GPU is visible)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--page-size", type=int, default=None, help=f"must be {PAGE_SIZE} (the MSA block)")
    p.add_argument("--attention-backend", default=None,
                   help="backend of the dense layers (cpu: torch_native; cuda: triton)")
    p.add_argument("--dry-run", action="store_true", help="print the SGLang command and exit")
    return p


def _flag_value(extra: list[str], flag: str) -> str | None:
    for i, arg in enumerate(extra):
        if arg == flag and i + 1 < len(extra):
            return extra[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _has_flag(extra: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in extra)


def resolve_device(requested: str | None, environ: dict[str, str]) -> str:
    """--device, else M3SERVE_DEVICE, else cuda when a GPU is visible, else cpu."""
    if requested:
        return requested
    env = environ.get("M3SERVE_DEVICE", "").strip().lower()
    if env:
        if env not in DEVICES:
            raise WorkerConfigError(f"M3SERVE_DEVICE is {env!r}, expected one of {DEVICES}")
        return env
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_rank_binding(tp: int, cpus: list[int]) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for `tp` CPU ranks: the allowed cores split into `tp` groups.

    SGLang's CPU ranks otherwise need one NUMA node each and refuse TP > number of NUMA nodes. With fewer
    cores than ranks, ranks share cores round-robin (correct, just slower)."""
    cpus = sorted(cpus)
    if len(cpus) >= tp:
        groups = [cpus[i * len(cpus) // tp : (i + 1) * len(cpus) // tp] for i in range(tp)]
    else:
        groups = [[cpus[i % len(cpus)]] for i in range(tp)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def validate_checkpoint(model_path: str) -> None:
    """Refuse a missing, non-M3 or inconsistent checkpoint before SGLang spends ~30 s starting up."""
    path = Path(model_path)
    if not path.is_dir():
        raise WorkerConfigError(f"--model-path {model_path!r} is not a directory (expected an M3 checkpoint)")
    try:
        from m3serve.config import M3ConfigError, load_m3_config
    except ImportError:  # the config module is not there: only the file check below
        if not (path / "config.json").is_file():
            raise WorkerConfigError(f"{model_path}: config.json is missing (is this an M3 checkpoint?)") from None
        return
    try:
        load_m3_config(path)
    except M3ConfigError as e:
        raise WorkerConfigError(f"checkpoint {model_path} cannot be served as MiniMax-M3: {e}") from e


def build_launch(argv: list[str], environ: dict[str, str] | None = None) -> WorkerLaunch:
    """Parse `m3serve worker` arguments into the SGLang command and environment (no side effects)."""
    args, extra = _parser().parse_known_args(argv)
    base_env = dict(os.environ if environ is None else environ)
    if args.page_size is not None and args.page_size != PAGE_SIZE:
        raise WorkerConfigError(
            f"--page-size {args.page_size} contradicts M3: the KV page must equal the MSA block of "
            f"{PAGE_SIZE} tokens (m3serve sets --page-size {PAGE_SIZE} itself)"
        )
    if args.tp < 1:
        raise WorkerConfigError(f"--tp {args.tp}: expected a positive number of GPUs/ranks")
    for flag, reason in _REFUSED_FLAGS.items():
        if reason and _has_flag(extra, flag):
            raise WorkerConfigError(f"{flag}: {reason}")
    for flag in ("--model-path", "--model", "--tp-size", "--device", "--page-size", "--attention-backend"):
        if _has_flag(extra, flag):
            raise WorkerConfigError(f"{flag} given twice")
    device = resolve_device(args.device, base_env)
    backend = args.attention_backend or ATTENTION_BACKENDS[device][0]
    if backend not in ATTENTION_BACKENDS[device]:
        raise WorkerConfigError(
            f"--attention-backend {backend} cannot run on {device} under m3serve's portable platform "
            f"(use one of {ATTENTION_BACKENDS[device]})"
        )
    kv_dtype = _flag_value(extra, "--kv-cache-dtype")
    if device == "cpu" and kv_dtype not in (None, "auto"):
        raise WorkerConfigError(f"--kv-cache-dtype {kv_dtype}: fp8 KV caches need a GPU; use auto on CPU")
    allowed = base_env.get("SGLANG_PLUGINS")
    if allowed and PLUGIN_NAME not in {x.strip() for x in allowed.split(",")}:
        raise WorkerConfigError(
            f"SGLANG_PLUGINS={allowed!r} excludes {PLUGIN_NAME}, the plugin that runs M3's sparse layers"
        )
    selected = base_env.get("SGLANG_PLATFORM")
    if selected and selected != PLATFORM_NAME:
        raise WorkerConfigError(f"SGLANG_PLATFORM={selected!r}: m3serve workers run on {PLATFORM_NAME!r}")
    validate_checkpoint(args.model_path)

    env = dict(base_env)
    env.update(SGLANG_PLATFORM=PLATFORM_NAME, M3SERVE_DEVICE=device, M3SERVE_M3_PLUGIN="1")
    for key, value in env_defaults(device).items():
        env.setdefault(key, value)
    command = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", args.model_path,
        "--tp-size", str(args.tp),
        "--device", device,
        "--page-size", str(PAGE_SIZE),
        "--attention-backend", backend,
        "--host", args.host,
        "--port", str(args.port),
    ]
    if device == "cpu" and args.tp > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in env:
        env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_rank_binding(args.tp, list(os.sched_getaffinity(0)))
    if device == "cuda":
        # SGLang's import-time CUDA checks must see "not CUDA" in every process (see platform/cuda.py).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CUDA_SITE), env.get("PYTHONPATH")) if p)
        # Decode runs in CUDA graphs (the plugin's grouped MoE and graph decode plans are capturable);
        # prefill/extend stays eager: its plan is built on the host per batch. --disable-cuda-graph turns
        # graphs off altogether.
        graph_flags = ("--disable-cuda-graph", "--cuda-graph-backend-prefill", "--disable-prefill-cuda-graph")
        if not any(_has_flag(extra, f) for f in graph_flags):
            command += ["--cuda-graph-backend-prefill", "disabled"]
    if not _has_flag(extra, "--incremental-streaming-output"):
        # Streamed /generate events carry only the new text and token ids. SGLang's default repeats the whole
        # output so far in every event: O(n^2) bytes that the worker serializes and the gateway parses
        # (16 MB for one 2,000-token reply on the tiny model, 0.58 MB as deltas; see
        # benchmarks/results/worker_stream_mode.md). The gateway reads both.
        command.append("--incremental-streaming-output")
    command += extra
    return WorkerLaunch(command, env, args.model_path, args.host, args.port, device, extra)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        launch = build_launch(argv)
    except WorkerConfigError as e:
        print(f"m3serve worker: error: {e}", file=sys.stderr)
        return 2
    if "--dry-run" in argv:
        print(" ".join(launch.command))
        return 0
    print(f"m3serve worker: starting SGLang on {launch.url} ({launch.device}): {' '.join(launch.command)}",
          file=sys.stderr, flush=True)
    os.execve(launch.command[0], launch.command, launch.env)
    return 0  # not reached
