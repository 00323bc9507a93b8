"""Make the plugin's activity observable from outside the server.

SGLang loads plugins before logging is configured, so their log lines never show. Instead:
  * one line on stderr the first time each kind of activity happens (it lands in the server log);
  * when M3SERVE_PLUGIN_MARKER_DIR names a folder, each server process keeps a JSON snapshot of its
    counters there (`plugin-<pid>.json`), rewritten at the first event of each kind and then at every
    power-of-two count (cheap, and current enough for tests). One file per process, because SGLang runs
    the plugin in the HTTP, scheduler (one per TP rank) and detokenizer processes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

MARKER_ENV = "M3SERVE_PLUGIN_MARKER_DIR"
EVERY_EVENT_ENV = "M3SERVE_PLUGIN_MARKER_EVERY_EVENT"  # "1": rewrite on every event (exact counts, for tests)

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
    if n & (n - 1) == 0 or os.environ.get(EVERY_EVENT_ENV) == "1":  # 1, 2, 4, 8, ... or always
        _write()
    return n


def counts() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def _write() -> None:
    folder = os.environ.get(MARKER_ENV)
    if not folder:
        return
    with _lock:
        data = {"pid": os.getpid(), "counts": dict(_counts), **_facts}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"plugin-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def read_all(folder: str) -> list[dict]:
    """Every process snapshot in a marker folder (for tests and diagnostics)."""
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith("plugin-") and name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                out.append(json.load(f))
    return out
