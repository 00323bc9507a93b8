"""The SGLang version our hooks were written against, and the start-up check."""

from __future__ import annotations

SUPPORTED_SGLANG = "0.5.23"


class UnsupportedSGLangError(RuntimeError):
    """The installed SGLang is not the version the m3serve hooks patch."""


def check_sglang_version(found: str | None = None) -> None:
    if found is None:
        import sglang

        found = getattr(sglang, "__version__", None)
    if found != SUPPORTED_SGLANG:
        raise UnsupportedSGLangError(
            f"m3serve's M3 plugin hooks SGLang internals written for sglang=={SUPPORTED_SGLANG}, "
            f"but sglang {found!r} is installed. Install sglang=={SUPPORTED_SGLANG} (pip install "
            f"'sglang=={SUPPORTED_SGLANG}') or update m3serve.plugin for the new version."
        )
