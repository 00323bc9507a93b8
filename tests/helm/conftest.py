"""Fixtures for the Helm chart tests (helpers live in helm_chart_tools.py, a name no other folder uses)."""

from __future__ import annotations

import pytest
from helm_chart_tools import Chart


@pytest.fixture(scope="session")
def chart() -> Chart:
    return Chart()
