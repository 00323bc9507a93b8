"""The agentic traffic shape: sessions that share one long prefix and grow turn by turn.

A session's conversation, as chat messages:

    system    the shared prefix (identical in every session: system prompt + tool docs)
    user      the session's task (unique)                          <- turn 1 ends here
    assistant the server's answer to turn 1
    user      a tool result (unique)                               <- turn 2 ends here
    assistant ...

so every turn re-sends the whole conversation, as an agent does, and a server with a prefix cache
reuses the shared prefix across sessions and each session's history across its turns.
Tool results go in user messages: every OpenAI-compatible server accepts them there, while `tool`
messages require matching tool calls in the previous assistant message.
All text is seeded: the same spec and seed give the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from m3bench.images import image_data_url
from m3bench.text import TokenCounter


@dataclass(frozen=True)
class WorkloadSpec:
    prefix_tokens: int = 60_000
    user_tokens: int = 1_024
    tool_result_tokens: int = 1_536
    turns: int = 8
    output_tokens: int = 256
    images_per_turn: int = 0
    image_width: int = 512
    image_height: int = 512
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = {
            "prefix_tokens": self.prefix_tokens >= 0,
            "user_tokens": self.user_tokens >= 1,
            "tool_result_tokens": self.tool_result_tokens >= 1,
            "turns": self.turns >= 1,
            "output_tokens": self.output_tokens >= 1,
            "images_per_turn": self.images_per_turn >= 0,
            "image_width": self.image_width >= 1,
            "image_height": self.image_height >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"workload: {name} out of range (got {getattr(self, name)})")


def text_message(role: str, text: str, images: list[str] | None = None) -> dict[str, Any]:
    """A chat message; with images, OpenAI's content-parts form (text first, then image_url parts)."""
    if not images:
        return {"role": role, "content": text}
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"role": role, "content": parts}


def shared_prefix(spec: WorkloadSpec, counter: TokenCounter) -> str:
    """The prefix every session starts with; depends only on the spec's seed and length."""
    return counter.make_text(spec.prefix_tokens, random.Random(f"prefix/{spec.seed}"))


class Session:
    """One agent's conversation. Call `messages()` for the next request, then `add_answer()`."""

    def __init__(self, index: int, spec: WorkloadSpec, prefix: str, counter: TokenCounter, salt: str = "") -> None:
        # `salt` separates runs (sweep points, repeats) so that one run's sessions are not cached for the next.
        self.index = index
        self.spec = spec
        self._counter = counter
        self._image_key = f"{spec.seed}/{salt}/{index}"
        rng = random.Random(f"session/{spec.seed}/{salt}/{index}")
        task = counter.make_text(spec.user_tokens, rng)
        self.tool_results = [counter.make_text(spec.tool_result_tokens, rng) for _ in range(spec.turns - 1)]
        self._messages = [text_message("system", prefix), text_message("user", task, self._images(0))]
        self._estimate = counter.count(prefix) + counter.count(task)
        self.turn = 0  # index of the next turn to send

    def _images(self, turn: int) -> list[str]:
        s = self.spec
        return [
            # str-seeded Random, not hash(): hash() of a str changes from process to process.
            image_data_url(s.image_width, s.image_height, random.Random(f"image/{self._image_key}/{turn}/{k}").randrange(2**31))
            for k in range(s.images_per_turn)
        ]

    @property
    def done(self) -> bool:
        return self.turn >= self.spec.turns

    def messages(self) -> list[dict[str, Any]]:
        if self.done:
            raise RuntimeError(f"session {self.index}: all {self.spec.turns} turns already sent")
        return list(self._messages)

    @property
    def estimated_prompt_tokens(self) -> int:
        """The client's estimate of the next prompt's length, without chat-template overhead."""
        return self._estimate

    def add_answer(self, answer: str) -> None:
        """Record the server's answer to the current turn and queue the next turn's tool result."""
        if self.done:
            raise RuntimeError(f"session {self.index}: answer after the last turn")
        self._messages.append(text_message("assistant", answer))
        self._estimate += self._counter.count(answer)
        if self.turn + 1 < self.spec.turns:
            tool = self.tool_results[self.turn]
            self._messages.append(text_message("user", tool, self._images(self.turn + 1)))
            self._estimate += self._counter.count(tool)
        self.turn += 1


def make_sessions(spec: WorkloadSpec, counter: TokenCounter, count: int, salt: str = "") -> list[Session]:
    spec.validate()
    if count < 1:
        raise ValueError(f"workload: number of sessions must be >= 1 (got {count})")
    prefix = shared_prefix(spec, counter)
    return [Session(i, spec, prefix, counter, salt) for i in range(count)]


def warmup_messages(spec: WorkloadSpec, counter: TokenCounter, index: int = 0) -> list[dict[str, Any]]:
    """The shared prefix plus a short unique question: fills the server's prefix cache before measuring."""
    question = counter.make_text(16, random.Random(f"warmup/{spec.seed}/{index}"))
    return [text_message("system", shared_prefix(spec, counter)), text_message("user", question)]
