"""The `m3serve` command: one entry point, one module per subcommand.

Each subcommand lives in its own module and parses its own arguments, so importing the CLI stays
cheap (no torch, no sglang) until a subcommand actually needs them.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help). The function takes the remaining argv and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("m3serve.serving.serve:main", "run gateway + worker(s); the tiny model on CPU when no model is given"),
    "worker": ("m3serve.serving.worker:main", "start one SGLang worker for an M3 checkpoint"),
    "gateway": ("m3serve.gateway:main", "start the Rust gateway in front of running workers"),
    "tiny-model": ("m3serve.tiny_model:main", "write a tiny random M3 checkpoint (weights, tokenizer, template)"),
    "bench": ("m3bench.cli:main", "agentic benchmark client for any OpenAI-compatible endpoint"),
}


def _usage() -> str:
    lines = ["usage: m3serve <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `m3serve <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"m3serve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = SUBCOMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
