"""`m3serve serve`: the main job. SGLang worker(s) plus the gateway in front, ready to take requests.

    m3serve serve                                  # tiny M3 (created on first use) on the CPU
    m3serve serve --model-path /ckpt --tp 8        # a real checkpoint on GPUs
    m3serve serve ... -- --context-length 65536    # arguments after `--` go to every worker

It starts the workers, waits until each answers /health, starts the gateway (when m3serve.gateway is
available; otherwise the single worker is served directly), prints where to send requests, and on
Ctrl-C / SIGTERM stops everything: every child runs in its own process group, which is signalled as a
whole, so no process outlives `m3serve serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from .processes import ManagedProcess, free_port, wait_healthy
from .worker import WorkerConfigError, WorkerLaunch, build_launch

CPU_MAX_TOTAL_TOKENS = 32768  # a small KV pool: CPU sizing would otherwise take it from the machine's RAM
TINY_SEED = 0


class _Stop(Exception):
    """Raised in the main thread by SIGINT/SIGTERM."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="m3serve serve",
        description="Serve MiniMax-M3: SGLang worker(s) behind the m3serve gateway. Without --model-path, "
        "serves the embedded tiny M3 on the CPU. Arguments after `--` are passed to every worker.",
    )
    p.add_argument("--model-path", help="M3 checkpoint directory (default: the tiny model, on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address the OpenAI endpoint binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port of the OpenAI endpoint (default 8000)")
    p.add_argument("--workers", type=int, default=1, help="number of SGLang workers (default 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of each worker (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cpu for the tiny model, else auto")
    p.add_argument("--max-total-tokens", type=int, help=f"KV pool size per worker (CPU default {CPU_MAX_TOTAL_TOKENS})")
    p.add_argument("--served-model-name", default="m3serve", help="model id clients send (default m3serve)")
    p.add_argument("--no-gateway", action="store_true", help="serve the (single) worker directly")
    p.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                   help="one option for the gateway, written with '=': --gateway-arg=--image-cache-mb=512 "
                        "(repeatable; the options are `m3serve gateway --help`'s)")
    p.add_argument("--log-dir", help="where worker and gateway logs go (default: a new temporary folder)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for readiness")
    p.add_argument("--cache-dir", default=os.environ.get("M3SERVE_CACHE_DIR"),
                   help="where the tiny model is kept (default $M3SERVE_CACHE_DIR or ~/.cache/m3serve)")
    return p


def tiny_model_path(cache_dir: str | None) -> Path:
    """The tiny checkpoint in the cache, written on first use (atomically: build aside, then rename)."""
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "m3serve"
    path = root / f"tiny-m3-seed{TINY_SEED}"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    from m3serve.tiny_model import write_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    print(f"m3serve serve: writing the tiny M3 checkpoint to {path}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    write_tiny_model(scratch, seed=TINY_SEED)
    try:
        scratch.rename(path)
    except OSError:  # another `serve` won the race: use its copy
        pass
    return path


def _worker_launches(args, extra: list[str], model_path: Path, device: str, direct: bool) -> list[WorkerLaunch]:
    launches = []
    for i in range(args.workers):
        port = args.port if direct else free_port()
        host = args.host if direct else "127.0.0.1"
        argv = ["--model-path", str(model_path), "--tp", str(args.tp), "--device", device,
                "--host", host, "--port", str(port), *extra]
        env = dict(os.environ)
        if device == "cuda" and args.workers > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(i * args.tp, (i + 1) * args.tp))
        launches.append(build_launch(argv, env))
    return launches


def _has_flag(extra: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in extra)


def _gateway_command():
    try:
        from m3serve.gateway import gateway_command
    except ImportError:
        return None
    return gateway_command


def _print_ready(base: str, model: str, log_dir: Path, direct: bool) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32})
    lines = [
        "",
        "m3serve is ready." + ("  (no gateway: the SGLang worker is served directly)" if direct else ""),
        f"  OpenAI base URL: {base}/v1   (model: {model})",
        "  try:",
        f"    curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"      -d '{body}'",
        f"  logs: {log_dir}",
        "Press Ctrl-C to stop.",
        "",
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    else:
        extra = []
    args = _parser().parse_args(argv)
    if args.workers < 1:
        print("m3serve serve: error: --workers must be at least 1", file=sys.stderr)
        return 2

    gateway_command = None if args.no_gateway else _gateway_command()
    direct = gateway_command is None
    if direct and args.gateway_arg:
        print("m3serve serve: error: --gateway-arg needs the gateway (drop --no-gateway)", file=sys.stderr)
        return 2
    if direct and args.workers > 1:
        print("m3serve serve: error: several workers need the gateway (m3serve.gateway is not available)",
              file=sys.stderr)
        return 2

    if args.model_path:
        model_path = Path(args.model_path)
        device = args.device
    else:
        model_path = tiny_model_path(args.cache_dir)
        device = args.device or "cpu"
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.max_total_tokens:
        extra += ["--max-total-tokens", str(args.max_total_tokens)]
    elif device == "cpu" and not _has_flag(extra, "--max-total-tokens"):
        extra += ["--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS)]
    if direct and not _has_flag(extra, "--served-model-name"):
        extra += ["--served-model-name", args.served_model_name]

    try:
        launches = _worker_launches(args, extra, model_path, device, direct)
    except WorkerConfigError as e:
        print(f"m3serve serve: error: {e}", file=sys.stderr)
        return 2

    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="m3serve-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[ManagedProcess] = []

    def on_signal(signum, _frame):
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        workers = []
        for i, launch in enumerate(launches):
            print(f"m3serve serve: starting worker {i} on {launch.url} ({launch.device}, model {model_path})",
                  flush=True)
            workers.append(ManagedProcess(f"worker {i}", launch.command, launch.env,
                                          log_dir / f"worker-{i}.log").start())
        children.extend(workers)
        for launch, proc in zip(launches, workers):
            wait_healthy(launch.url, [proc], args.ready_timeout)
        if direct:
            base = f"http://{args.host}:{args.port}"
        else:
            cmd = gateway_command([w.url for w in launches], str(model_path), args.host, args.port,
                                  ["--served-model-name", args.served_model_name, *args.gateway_arg])
            print(f"m3serve serve: starting the gateway on http://{args.host}:{args.port}", flush=True)
            gateway = ManagedProcess("gateway", cmd, dict(os.environ), log_dir / "gateway.log").start()
            children.append(gateway)
            base = f"http://{args.host}:{args.port}"
            probe = base.replace("0.0.0.0", "127.0.0.1")
            wait_healthy(probe, [gateway, *workers], args.ready_timeout)
        _print_ready(base, args.served_model_name, log_dir, direct)
        while True:
            for p in children:
                if not p.alive():
                    print(f"m3serve serve: {p.name} exited with code {p.proc.returncode}; stopping.\n"
                          f"{p.log_tail(3000)}", file=sys.stderr, flush=True)
                    return 1
            time.sleep(1.0)
    except _Stop as e:
        print(f"\nm3serve serve: {e}: shutting down", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"m3serve serve: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        # Ignore further Ctrl-C while stopping, so the children are always reaped.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        for p in reversed(children):
            p.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if children:
            print("m3serve serve: all processes stopped", flush=True)
