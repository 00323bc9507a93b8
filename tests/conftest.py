"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The default tiny M3 checkpoint (seed 0), written once per test session."""
    from m3serve.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-m3") / "ckpt", seed=0)
