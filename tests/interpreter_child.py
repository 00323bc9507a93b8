"""Run a test module's kernel cases in a child process under the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported (and other tests in the same process may already have
imported the kernels), so the cases run in a fresh interpreter: the test module, run as a script, is the child.
Two forms:
  * one child per case: `run_interpreted(__file__, name)` in the test, `interpreted_main(CASES)` under `__main__`; the
    child prints the case's result as JSON on its last line;
  * one child for the whole module: `interpreter_report(__file__)`; the child (run with `--child`) prints one
    JSON line per case ({"name": ..., "rel_err": ...} or {"name": ..., "error": ...}).
Lives in tests/ (on sys.path through the root conftest) so that every test folder can use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest


def _interpreted_env() -> dict[str, str]:
    # The child runs a test file as a script: put this folder on its path so it finds this module too.
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)


def run_interpreted(test_file: str, name: str, timeout: float = 600) -> Any:
    """Run `python test_file name` under TRITON_INTERPRET=1; fail with its output unless it exits 0; return the
    JSON of its last output line."""
    proc = subprocess.run([sys.executable, test_file, name], env=_interpreted_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"case {name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interpreted_main(cases: dict[str, Callable[[], Any]]) -> None:
    """The child's side of run_interpreted: run the case named on the command line, print its result as JSON."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run through pytest, or with TRITON_INTERPRET=1")
    import torch

    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs on every run
    print(json.dumps(cases[sys.argv[1]]()))


def interpreter_report(test_file: str, timeout: float) -> dict:
    """Run `python test_file --child` under TRITON_INTERPRET=1 and collect its per-case rows by name."""
    proc = subprocess.run([sys.executable, test_file, "--child"], env=_interpreted_env(), capture_output=True,
                          text=True, timeout=timeout)
    report = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            report[row["name"]] = row
    if not report:
        pytest.fail(f"interpreter child produced no report:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return report
