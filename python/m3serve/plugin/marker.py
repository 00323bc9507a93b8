"""Make the plugin's activity observable from outside the server.

SGLang loads plugins before logging is configured, so their log lines never show. Instead:
  * one line on stderr the first time each kind of activity happens (it lands in the server log);
  * when M3SERVE_PLUGIN_MARKER names a file, a JSON snapshot of the counters, rewritten at the first
    event of each kind and then at every power-of-two count (cheap, and current enough for tests).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

MARKER_ENV = "M3SERVE_PLUGIN_MARKER"

_lock = threading.Lock()
_counts: dict[str, int] = {}
_facts: dict[str, Any] = {}


def note(key: str, value: Any) -> None:
    """Record a fact (e.g. which kernel module ran); written with the next snapshot."""
    with _lock:
        _facts[key] = value


def record(event: str, message: str | None = None) -> int:
    """Count one `event`; announce its first occurrence. Returns the new count."""
    with _lock:
        n = _counts.get(event, 0) + 1
        _counts[event] = n
    if n == 1 and message:
        print(f"[m3serve] {message}", file=sys.stderr, flush=True)
    if n & (n - 1) == 0:  # 1, 2, 4, 8, ...
        _write()
    return n


def counts() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def _write() -> None:
    path = os.environ.get(MARKER_ENV)
    if not path:
        return
    with _lock:
        data = {"pid": os.getpid(), "counts": dict(_counts), **_facts}
    # One file per process would be more exact; TP ranks all write the same counts, so last write wins.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
