"""Synthetic text of a requested length in tokens.

Without a tokenizer, one token is approximated by one common English word: most BPE vocabularies
(M3's included) hold " the", " config", " returns" ... as single tokens, so N words are close to N tokens.
The server's usage block reports the real prompt length, and that is what the results use.
With a tokenizer (a tokenizer.json or a directory holding one), text is cut to the exact token count.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Protocol

# Short, common words that are single tokens in typical BPE vocabularies. Flavoured like tool docs and
# code-agent chatter so that the prompts look like what an agent sends.
WORDS = (
    "the a an and or of to in on for with by from at as is are was be can will may must should "
    "file path line code test run build call return value type name list map set key field item "
    "error result output input data user tool agent task step plan check read write open close "
    "new old next last first each all any some more less true false none null string number int "
    "function method class module package import export config option flag default value request "
    "response server client session cache token model message query update delete create find "
    "search match replace patch diff commit branch merge review change fix bug issue note doc "
    "use used uses make makes get gets put send receive start stop wait time size count index "
    "range start end left right top bottom inside outside before after when then else if not "
    "this that these those it its we you they our your their here there now only also just"
).split()


class TokenCounter(Protocol):
    """Makes text of a given token length; `exact` tells whether lengths are real tokens or words."""

    exact: bool

    def make_text(self, n_tokens: int, rng: random.Random) -> str: ...

    def count(self, text: str) -> int: ...


def random_words(n: int, rng: random.Random) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


class WordCounter:
    """One word per token: no tokenizer needed."""

    exact = False

    def make_text(self, n_tokens: int, rng: random.Random) -> str:
        return " ".join(random_words(n_tokens, rng))

    def count(self, text: str) -> int:
        return len(text.split())


class TokenizerCounter:
    """Exact token counts with a Hugging Face `tokenizers` tokenizer (tokenizer.json)."""

    exact = True

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # the bench package does not require it: only this option does
            raise SystemExit("--tokenizer needs the `tokenizers` package: pip install tokenizers") from exc
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise SystemExit(f"--tokenizer: no tokenizer.json at {p}")
        self._tok = Tokenizer.from_file(str(p))

    def make_text(self, n_tokens: int, rng: random.Random) -> str:
        if n_tokens == 0:
            return ""
        words: list[str] = []
        ids: list[int] = []
        # Grow past the target (slack for the cut below), then cut the ids and decode.
        while len(ids) < n_tokens + 16:
            words += random_words(max(16, n_tokens - len(ids) + 16), rng)
            ids = self._tok.encode(" ".join(words), add_special_tokens=False).ids
        # Decoding a cut and encoding it again need not give the same count (a cut word may merge
        # differently), so move the cut until the text re-encodes to n_tokens; keep the closest.
        cut, best = n_tokens, ""
        best_err = None
        for _ in range(8):
            text = self._tok.decode(ids[:cut])
            err = self.count(text) - n_tokens
            if best_err is None or abs(err) < abs(best_err):
                best, best_err = text, err
            if err == 0:
                break
            cut = max(1, min(len(ids), cut - err))
        return best

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)


def make_counter(tokenizer: str | None) -> TokenCounter:
    return TokenizerCounter(tokenizer) if tokenizer else WordCounter()
