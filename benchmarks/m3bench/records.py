"""What one request measured: the raw timings and counts that every metric is computed from.

Kept separate from the metric math so the math can be tested on hand-built records, and from the
HTTP client so the client only fills fields in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One chat completion request, as seen by the client.

    Times are seconds on the client's monotonic clock. `chunk_times` holds the arrival time of every
    streamed chunk that carried generated text (content or reasoning), in order; time to first token and
    the inter-token latencies are derived from it, as SGLang's bench_serving does.
    """

    session: int
    turn: int
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    success: bool = False
    error: str = ""
    # Token counts reported by the server (usage); None when the server did not report them.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    # The client's own count of text-carrying chunks: the output length when usage is missing.
    text_chunks: int = 0
    # The client's estimate of the prompt length (words or tokenizer tokens), for the record.
    estimated_prompt_tokens: int = 0
    generated_text: str = ""
    finish_reason: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive text chunks (one per token when the server streams token by token)."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def output_tokens(self) -> int:
        """Generated tokens: the server's count when it gave one, else the number of text chunks."""
        return self.completion_tokens if self.completion_tokens is not None else self.text_chunks

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (latency - TTFT) / (tokens - 1), bench_serving's definition."""
        ttft = self.ttft
        if ttft is None or self.output_tokens <= 1:
            return None
        return (self.latency - ttft) / (self.output_tokens - 1)

    def to_dict(self, with_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_text:
            d.pop("generated_text")
        d.update(latency=self.latency, ttft=self.ttft, tpot=self.tpot, output_tokens=self.output_tokens)
        return d
