"""preStop hook of a worker pod: return once its SGLang server has no running or queued requests.

Kubernetes runs this before it sends SIGTERM, so in-flight generations (long agent turns) finish instead
of being cut. The gateway stops routing to a pod as soon as the pod is marked for deletion; this waits
until the server's own counters (sglang:num_running_reqs + sglang:num_queue_reqs on /metrics) have been
zero for `--quiet-polls` polls in a row (and at least `--min-seconds` have passed: the gateway only
notices the deletion at its next poll of the pods API), or until `--timeout` seconds have passed. If the
server cannot be reached there is nothing left to drain, and it returns at once. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request

BUSY_METRICS = ("sglang:num_running_reqs", "sglang:num_queue_reqs")


def busy_requests(metrics_text: str) -> float:
    """Sum of the busy-request gauges in a Prometheus text exposition (all label sets)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in BUSY_METRICS:
            total += float(line.rsplit(" ", 1)[1])
    return total


def drain(metrics_url: str, timeout: float, interval: float, quiet_polls: int, min_seconds: float = 0) -> str:
    start = time.monotonic()
    deadline = start + timeout
    quiet = 0
    while True:
        try:
            with urllib.request.urlopen(metrics_url, timeout=5) as resp:
                busy = busy_requests(resp.read().decode("utf-8", "replace"))
        except OSError as exc:
            return f"server unreachable ({exc}); nothing to drain"
        quiet = quiet + 1 if busy == 0 else 0
        if quiet >= quiet_polls and time.monotonic() - start >= min_seconds:
            return "drained"
        if time.monotonic() + interval > deadline:
            return f"timeout with {busy:g} requests still in flight"
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--metrics-url", required=True, help="SGLang /metrics URL; ${VAR} is expanded")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--interval", type=float, default=5)
    ap.add_argument("--quiet-polls", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=0, help="never return 'drained' before this")
    args = ap.parse_args(argv)
    # Lifecycle hooks get no $(VAR) expansion from Kubernetes, so do it here (followers pass the leader's
    # address as ${LWS_LEADER_ADDRESS}).
    url = os.path.expandvars(args.metrics_url)
    print(
        f"drain: {drain(url, args.timeout, args.interval, args.quiet_polls, args.min_seconds)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
