"""`m3serve bench`: placeholder until the agentic client lands."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    raise SystemExit("m3serve bench: not implemented yet")
