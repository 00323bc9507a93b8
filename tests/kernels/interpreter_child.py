"""Run a test module's kernel cases in a child process under the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported, so the cases run in a fresh interpreter that
prints one JSON line per case ({"name": ..., "rel_err": ...} or {"name": ..., "error": ...}).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def interpreter_report(test_file: str, timeout: float) -> dict:
    """Run `python test_file --child` under TRITON_INTERPRET=1 and collect its per-case rows by name."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, test_file, "--child"], env=env, capture_output=True, text=True,
                          timeout=timeout)
    report = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            report[row["name"]] = row
    if not report:
        pytest.fail(f"interpreter child produced no report:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return report
