"""`m3serve bench`: agentic multi-turn load against any OpenAI-compatible endpoint.

Defaults are the agentic-60k-c8 shape (research/perf_anchors.md section 4.1): a 60,000-token shared
prefix, 8 concurrent sessions of 8 turns, 1,024-token tasks, 1,536-token tool results, 256 output tokens.

`m3serve bench compare A.json B.json ...` puts several runs (arms) side by side.

Exit status: 0 when every request succeeded, 1 when some failed (results are still written),
2 for bad arguments or a server that cannot be measured at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import httpx

from m3bench.client import Endpoint, api_root, list_models
from m3bench.report import build_result, format_table, write_json
from m3bench.runner import BenchmarkError, run_sweep
from m3bench.text import make_counter
from m3bench.workload import WorkloadSpec


def concurrency_list(text: str) -> list[int]:
    """'1,4,8,16' -> [1, 4, 8, 16]; every value a positive integer."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,8,16, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrency values must be integers >= 1, got {text!r}")
    return values


def image_size(text: str) -> tuple[int, int]:
    """'512' or '640x480' -> (width, height)."""
    try:
        w, _, h = text.lower().partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 512x512, got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return size


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--extra-body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra-body must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3serve bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible API root")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    g.add_argument("--model", help="model name; default: the only model the server lists at /models")
    g.add_argument("--no-fixed-output", action="store_true",
                   help="do not send ignore_eos/min_tokens (for servers that reject unknown fields)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--extra-body", type=json_object, default={}, help="JSON object merged into every request")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds to wait for a connection or for the next bytes of a response")

    w = p.add_argument_group("workload")
    w.add_argument("--prefix-tokens", type=int, default=60_000, help="shared prefix length (system prompt + tool docs)")
    w.add_argument("--user-tokens", type=int, default=1_024, help="each session's unique first-turn task")
    w.add_argument("--tool-result-tokens", type=int, default=1_536, help="tool result appended on each later turn")
    w.add_argument("--turns", type=int, default=8, help="turns per session")
    w.add_argument("--output-tokens", type=int, default=256, help="tokens generated per turn")
    w.add_argument("--images-per-turn", type=int, default=0, help="generated images attached to each new user message")
    w.add_argument("--image-size", type=image_size, default=(512, 512), help="WIDTHxHEIGHT of generated images")
    w.add_argument("--tokenizer", help="tokenizer.json (or its directory) for exact lengths; default: words ~ tokens")
    w.add_argument("--seed", type=int, default=0)

    ld = p.add_argument_group("load")
    ld.add_argument("--concurrency", type=concurrency_list, default=[8],
                    help="concurrent sessions; a list like 1,4,8,16 runs a sweep")
    ld.add_argument("--num-sessions", type=int, help="sessions per run; default: the concurrency")
    ld.add_argument("--think-time", type=float, default=0.0, help="seconds between a session's turns")
    ld.add_argument("--warmup-requests", type=int, default=1, help="prefix-carrying requests before measuring")
    ld.add_argument("--repeats", type=int, default=1, help="runs per concurrency; the summary is their median")

    o = p.add_argument_group("output")
    o.add_argument("--output", help="write results JSON here")
    o.add_argument("--output-details", action="store_true", help="include per-request records in the JSON")
    o.add_argument("--plot-dir", help="write throughput/latency plots here (default with a sweep: beside --output)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> WorkloadSpec:
    if args.num_sessions is not None and args.num_sessions < 1:
        p.error("--num-sessions must be >= 1")
    for name in ("warmup_requests", "think_time"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.request_timeout <= 0:
        p.error("--request-timeout must be > 0")
    try:
        api_root(args.base_url)
    except ValueError as exc:
        p.error(str(exc))
    spec = WorkloadSpec(
        prefix_tokens=args.prefix_tokens, user_tokens=args.user_tokens,
        tool_result_tokens=args.tool_result_tokens, turns=args.turns, output_tokens=args.output_tokens,
        images_per_turn=args.images_per_turn, image_width=args.image_size[0], image_height=args.image_size[1],
        seed=args.seed,
    )
    try:
        spec.validate()
    except ValueError as exc:
        p.error(str(exc).replace("workload: ", "--").replace("_", "-"))
    return spec


async def _resolve_model(base_url: str, api_key: str | None) -> str:
    try:
        async with httpx.AsyncClient() as client:
            models = await list_models(client, base_url, api_key)
    except (httpx.HTTPError, ValueError) as exc:
        raise BenchmarkError(f"could not list models at {api_root(base_url)}/models ({exc}); pass --model") from exc
    if len(models) != 1:
        raise BenchmarkError(f"server lists {len(models)} models {models}; pick one with --model")
    return models[0]


async def _run(args: argparse.Namespace, spec: WorkloadSpec, argv: list[str]) -> int:
    model = args.model or await _resolve_model(args.base_url, args.api_key)
    endpoint = Endpoint(base_url=args.base_url, model=model, api_key=args.api_key,
                        fixed_output=not args.no_fixed_output, temperature=args.temperature,
                        timeout_s=args.request_timeout, extra_body=args.extra_body)
    counter = make_counter(args.tokenizer)
    aborted = None
    try:
        points = await run_sweep(endpoint, spec, counter, args.concurrency, repeats=args.repeats,
                                 num_sessions=args.num_sessions, warmup_requests=args.warmup_requests,
                                 think_time_s=args.think_time, progress=not args.no_progress)
    except BenchmarkError as exc:
        if not exc.points:
            raise
        # Keep the sweep points that finished; the error is reported and the exit status stays 2.
        points, aborted = exc.points, str(exc)
    print(f"m3serve bench: {model} at {endpoint.api_root}; prefix {spec.prefix_tokens} "
          f"{'tokens' if counter.exact else 'words'}, {spec.turns} turns, {spec.output_tokens} output tokens")
    print(format_table(points))
    settings = {k: getattr(args, k) for k in ("concurrency", "num_sessions", "think_time", "warmup_requests",
                                               "repeats", "tokenizer")}
    settings["length_unit"] = "tokens" if counter.exact else "words"
    settings["aborted"] = aborted
    if args.output:
        result = build_result(endpoint, spec, points, argv, settings, details=args.output_details)
        print(f"results: {write_json(result, args.output)}")
    plot_dir = args.plot_dir or (str(Path(args.output).parent) if args.output and len(points) > 1 else None)
    if plot_dir:
        from m3bench.plots import plot_sweep

        prefix = Path(args.output).stem + "_" if args.output else ""
        try:
            paths = plot_sweep(points, plot_dir, title=f"{model}, prefix {spec.prefix_tokens}", prefix=prefix)
        except ImportError:  # after a long run, do not lose the numbers over a missing plotting library
            print("plots skipped: matplotlib is not installed (plot later with "
                  "`m3serve bench compare RESULT.json --plot-dir DIR`)", file=sys.stderr)
            paths = []
        for path in paths:
            print(f"plot: {path}")
    if aborted:
        print(f"m3serve bench: sweep stopped early: {aborted}", file=sys.stderr)
        return 2
    return 1 if any(p["summary"]["failed"] for p in points) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from m3bench.compare import main as compare_main

        return compare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = _check_args(parser, args)
    try:
        return asyncio.run(_run(args, spec, argv))
    except BenchmarkError as exc:
        print(f"m3serve bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
