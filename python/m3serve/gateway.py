"""`m3serve gateway`: start the Rust gateway (`m3serve._gateway`) in front of running SGLang workers.

The flags become one JSON config for `m3serve._gateway.serve`, which serves with the GIL released
and returns on SIGINT/SIGTERM. `gateway_command` is the argv `m3serve serve` uses to start the
gateway as a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any


def gateway_command(
    worker_urls: Sequence[str],
    model_path: str,
    host: str,
    port: int,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argv that starts a gateway for `worker_urls` with this interpreter."""
    if not worker_urls:
        raise ValueError("gateway_command needs at least one worker URL")
    return [
        sys.executable,
        "-m",
        "m3serve.cli",
        "gateway",
        "--worker-urls",
        *worker_urls,
        "--model-path",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        *extra_args,
    ]


def _non_negative_mib(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a size in MiB, 0 or more (got {text})")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="m3serve gateway",
        description="OpenAI-compatible gateway for MiniMax-M3 in front of SGLang workers "
        "(templating, tokenization and images in Rust; prefix/session-aware routing).",
    )
    p.add_argument("--worker-urls", nargs="*", default=[], metavar="URL", help="SGLang worker base URLs")
    p.add_argument("--model-path", help="checkpoint directory (chat template, tokenizer, image processor)")
    p.add_argument("--served-model-name", help="model id clients send (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="data-plane Bearer key (repeatable; also M3SERVE_API_KEY)",
    )
    p.add_argument("--api-key-file", help="file with one API key per line")
    p.add_argument(
        "--admin-key",
        default=os.environ.get("M3SERVE_ADMIN_KEY"),
        help="key for /admin/* (also M3SERVE_ADMIN_KEY); the admin API is off without one",
    )
    p.add_argument(
        "--allow-private-image-urls", action="store_true", help="allow image URLs to private addresses"
    )
    p.add_argument(
        "--image-cache-mb",
        type=_non_negative_mib,
        default=256.0,
        help="MiB of preprocessed images kept so a resent image is not decoded again (0 disables)",
    )
    p.add_argument("--context-length", type=int, help="override the checkpoint's context length")
    p.add_argument("--default-max-tokens", type=int, default=8192)
    p.add_argument("--max-body-mb", type=float, default=64.0, help="request body limit in MiB")
    p.add_argument("--upstream-timeout", type=float, default=600.0, help="seconds to wait for a worker")
    p.add_argument("--connect-timeout", type=float, default=3.0)
    p.add_argument("--max-retries", type=int, default=2, help="other workers tried after a connection error")
    p.add_argument("--health-interval", type=float, default=5.0)
    p.add_argument("--health-failure-threshold", type=int, default=2)
    p.add_argument("--health-timeout", type=float, default=3.0,
                   help="seconds a /health check may take; a timeout while the worker serves our requests "
                        "counts as busy, not as a failure")
    p.add_argument(
        "--breaker-threshold", type=int, default=5, help="consecutive failures that open a breaker"
    )
    p.add_argument("--breaker-open-secs", type=float, default=10.0)
    p.add_argument("--max-inflight-per-worker", type=int, default=512)
    p.add_argument("--balance-abs-threshold", type=int, default=8)
    p.add_argument("--balance-rel-threshold", type=float, default=1.5)
    p.add_argument("--prefix-chunk-tokens", type=int, default=128, help="the workers' radix page size")
    p.add_argument("--session-ttl", type=float, default=3600.0)
    p.add_argument("--k8s-selector", help="discover worker pods by this label selector")
    p.add_argument("--k8s-namespace")
    p.add_argument("--k8s-api-server", help="API server URL (default: in-cluster)")
    p.add_argument("--k8s-port", type=int, default=30000, help="worker port on each pod")
    p.add_argument("--k8s-poll-interval", type=float, default=5.0)
    p.add_argument("--k8s-token-path", default="/var/run/secrets/kubernetes.io/serviceaccount/token")
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds open requests may finish after SIGTERM/SIGINT",
    )
    p.add_argument("--log-format", choices=["json", "text"], default="json")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--tokenizer-mode",
        choices=["model", "bytes"],
        default="model",
        help="`bytes` is for tests only: prompt bytes as token ids, no checkpoint needed",
    )
    p.add_argument("--print-config", action="store_true", help="print the JSON config and exit")
    return p


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON config `m3serve._gateway.serve` takes."""
    cfg: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "worker_urls": list(args.worker_urls),
        "model_path": args.model_path,
        "served_model_name": args.served_model_name,
        "tokenizer_mode": args.tokenizer_mode,
        "context_length": args.context_length,
        "default_max_tokens": args.default_max_tokens,
        "api_keys": list(args.api_key),
        "api_key_file": args.api_key_file,
        "admin_key": args.admin_key,
        "allow_private_image_urls": args.allow_private_image_urls,
        "image_cache_bytes": int(args.image_cache_mb * 1024 * 1024),
        "max_body_bytes": int(args.max_body_mb * 1024 * 1024),
        "upstream_timeout_secs": args.upstream_timeout,
        "connect_timeout_secs": args.connect_timeout,
        "max_retries": args.max_retries,
        "health_interval_secs": args.health_interval,
        "health_failure_threshold": args.health_failure_threshold,
        "health_timeout_secs": args.health_timeout,
        "breaker_failure_threshold": args.breaker_threshold,
        "breaker_open_secs": args.breaker_open_secs,
        "max_inflight_per_worker": args.max_inflight_per_worker,
        "balance_abs_threshold": args.balance_abs_threshold,
        "balance_rel_threshold": args.balance_rel_threshold,
        "prefix_chunk_tokens": args.prefix_chunk_tokens,
        "session_ttl_secs": args.session_ttl,
        "shutdown_grace_secs": args.shutdown_grace,
        "log_format": args.log_format,
        "log_level": args.log_level,
    }
    if args.k8s_selector:
        cfg["kubernetes"] = {
            "label_selector": args.k8s_selector,
            "namespace": args.k8s_namespace,
            "api_server": args.k8s_api_server,
            "port": args.k8s_port,
            "poll_interval_secs": args.k8s_poll_interval,
            "token_path": args.k8s_token_path,
        }
    # None means "use the gateway's default"; serde treats a missing key that way.
    return {k: v for k, v in cfg.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokenizer_mode == "model" and not args.model_path:
        print("m3serve gateway: --model-path is required", file=sys.stderr)
        return 2
    if not args.worker_urls and not args.k8s_selector:
        print(
            "m3serve gateway: give --worker-urls or --k8s-selector (or add workers via the admin API)",
            file=sys.stderr,
        )
        if not args.admin_key:
            return 2
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg, indent=2))
        return 0
    from m3serve import _gateway

    try:
        _gateway.serve(json.dumps(cfg))
    except KeyboardInterrupt:
        return 0
    except ValueError as e:  # bad configuration
        print(f"m3serve gateway: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # could not start (port taken, checkpoint unreadable, ...)
        print(f"m3serve gateway: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
