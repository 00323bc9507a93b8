"""Streaming chat completions over httpx, timed chunk by chunk.

Speaks the OpenAI chat API (`POST {base}/chat/completions` with `"stream": true` and
`stream_options.include_usage`), so it works against any OpenAI-compatible server. Fixed output lengths
use SGLang's (and vLLM's) extra body fields `ignore_eos` and `min_tokens`; turn them off for servers that
reject unknown fields.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from m3bench.records import RequestRecord


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str | None = None
    fixed_output: bool = True  # send ignore_eos + min_tokens so every answer has exactly max_tokens tokens
    temperature: float = 0.0
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def api_root(self) -> str:
        return api_root(self.base_url)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def api_root(base_url: str) -> str:
    """`http://host:port` -> `http://host:port/v1`; a URL that already has a path is kept as given."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--base-url must be an http(s) URL like http://127.0.0.1:8000/v1, got {base_url!r}")
    root = base_url.rstrip("/")
    return root if parts.path.strip("/") else root + "/v1"


def chat_payload(endpoint: Endpoint, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": endpoint.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": endpoint.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint.fixed_output:
        payload["ignore_eos"] = True
        payload["min_tokens"] = max_tokens
    payload.update(endpoint.extra_body)
    return payload


def _apply_chunk(record: RequestRecord, chunk: dict[str, Any], now: float, pieces: list[str]) -> None:
    """Fold one streamed chunk into the record: text timing, finish reason, usage."""
    if chunk.get("error"):
        err = chunk["error"]
        raise StreamError(f"server error in stream: {err.get('message', err) if isinstance(err, dict) else err}")
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        # Reasoning models stream thinking separately; it is generated output all the same.
        text = "".join(delta.get(k) or "" for k in ("reasoning_content", "reasoning", "content"))
        if text:
            record.chunk_times.append(now)
            record.text_chunks += 1
        if delta.get("content"):
            pieces.append(delta["content"])
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens")
        record.completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            record.cached_tokens = int(details["cached_tokens"])


class StreamError(Exception):
    pass


async def stream_chat(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    messages: list[dict[str, Any]],
    max_tokens: int,
    record: RequestRecord,
) -> RequestRecord:
    """Send one streaming request and fill `record`; never raises for server or network failures."""
    url = endpoint.api_root + "/chat/completions"
    payload = chat_payload(endpoint, messages, max_tokens)
    pieces: list[str] = []
    done = False
    record.start = time.perf_counter()
    try:
        async with client.stream(
            "POST", url, json=payload, headers=endpoint.headers(), timeout=endpoint.timeout_s
        ) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                raise StreamError(f"HTTP {resp.status_code}: {body[:300]}")
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError as exc:
                    raise StreamError(f"bad JSON in stream: {data[:120]!r}") from exc
                _apply_chunk(record, chunk, now, pieces)
        if not done and record.finish_reason is None:
            raise StreamError("stream ended before [DONE] and without a finish_reason")
        record.success = True
    except StreamError as exc:
        record.error = str(exc)
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    record.end = time.perf_counter()
    record.generated_text = "".join(pieces)
    return record


async def list_models(client: httpx.AsyncClient, base_url: str, api_key: str | None = None) -> list[str]:
    """Model ids from GET /models, to default --model when the server serves exactly one."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = await client.get(api_root(base_url) + "/models", headers=headers, timeout=30)
    resp.raise_for_status()
    return [m["id"] for m in resp.json().get("data", [])]
