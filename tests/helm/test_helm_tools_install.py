"""scripts/install_helm_tools.sh is idempotent: a second run (bootstrap re-run) rebuilds nothing."""

from __future__ import annotations

import time

from helm_chart_tools import REPO, TOOLS, run


def test_second_install_is_a_quick_no_op(chart):  # `chart` fixture: the first install happened
    stamps = {p: p.stat().st_mtime for p in (TOOLS / "bin" / "helm", TOOLS / "schemas" / ".stamp")}
    start = time.monotonic()
    result = run(["bash", str(REPO / "scripts" / "install_helm_tools.sh"), str(TOOLS / "bin")], timeout=600)
    assert result.returncode == 0, result.output
    assert "helm, helm-unittest, kubeconform: up to date" in result.output
    assert "kubeconform schemas: up to date" in result.output
    assert {p: p.stat().st_mtime for p in stamps} == stamps
    assert time.monotonic() - start < 30
