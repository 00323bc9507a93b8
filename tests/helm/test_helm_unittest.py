"""The chart's helm-unittest suites (deploy/helm/m3serve/tests/*_test.yaml), one pytest test per suite."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from helm_chart_tools import CHART, run

SUITES = sorted((CHART / "tests").glob("*_test.yaml"))


@pytest.fixture(scope="module")
def junit(chart, tmp_path_factory):
    """Run every suite once (strict parsing) and return {suite file name: (tests, failures, details)}."""
    report = tmp_path_factory.mktemp("helm-unittest") / "junit.xml"
    result = run([chart.unittest, "--strict", "-t", "JUnit", "-o", str(report), str(CHART)])
    assert report.exists(), f"helm-unittest wrote no report:\n{result.output}"
    suites = {}
    for suite in ET.parse(report).getroot().iter("testsuite"):
        cases = list(suite.iter("testcase"))
        # A skipped case is not a pass: count it with the failures.
        problems = [(c, el) for c in cases for el in c if el.tag in ("failure", "error", "skipped")]
        failed = {id(c) for c, _ in problems}
        details = "\n".join(
            f"- {c.get('name')} [{el.tag}]: {el.get('message') or ''} {el.text or ''}" for c, el in problems
        )
        suites[suite.get("name")] = (len(cases), len(failed), details)
    return suites, result


def test_suites_found():
    assert len(SUITES) >= 6, SUITES


@pytest.mark.parametrize("suite", SUITES, ids=[s.stem for s in SUITES])
def test_helm_unittest_suite(junit, suite):
    suites, result = junit
    # The JUnit report names a suite by its file path relative to the chart or by its title; accept either.
    key = next((k for k in suites if k.endswith(suite.name) or k == _title(suite)), None)
    assert key is not None, f"suite {suite.name} not in report ({sorted(suites)}):\n{result.output}"
    tests, failures, details = suites[key]
    assert tests > 0, f"{suite.name}: no tests ran"
    assert failures == 0, f"{suite.name}: {failures} of {tests} failed\n{details}\n{result.output}"


def _title(suite_file) -> str:
    for line in suite_file.read_text().splitlines():
        if line.startswith("suite:"):
            return line.split(":", 1)[1].strip()
    return ""
