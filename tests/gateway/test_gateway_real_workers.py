"""The gateway in front of real SGLang workers serving the tiny M3 on CPU (`m3serve worker`), in
production mode (the checkpoint's chat template and tokenizer in Rust), through the openai client:
plain and streamed chat, tools, completions, usage with cached tokens, prefix affinity across two
workers, and failover when one worker is killed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import openai
import pytest

from m3serve.serving.processes import ManagedProcess, free_port, wait_healthy
from m3serve.serving.worker import build_launch

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
STARTUP_TIMEOUT_S = float(os.environ.get("M3SERVE_TEST_STARTUP_TIMEOUT", "420"))
# A small context and few running requests keep the worker's per-request token tables small: with
# the checkpoint's 1M context they take several GB of RAM on CPU.
WORKER_ARGS = [
    "--dtype", "float32", "--context-length", "8192", "--max-total-tokens", "8192", "--max-running-requests", "8",
    "--skip-server-warmup", "--enable-cache-report", "--log-level", "warning",
]  # fmt: skip


@pytest.fixture(scope="module")
def real_worker(tiny_checkpoint, tmp_path_factory):
    """One real worker: a CPU SGLang server takes several GB of RAM, so the suite runs one and
    uses a fake worker as the second one where a pool is needed."""
    workdir = tmp_path_factory.mktemp("gw-real")
    port = free_port()
    launch = build_launch(
        ["--model-path", str(tiny_checkpoint), "--device", "cpu", "--port", str(port), *WORKER_ARGS],
        dict(os.environ),
    )
    proc = ManagedProcess("worker", launch.command, launch.env, workdir / "worker.log").start()
    try:
        wait_healthy(launch.url, [proc], STARTUP_TIMEOUT_S)
        yield launch.url, proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gateway(real_worker, tiny_checkpoint, tmp_path_factory):
    from m3serve.gateway import gateway_command

    port = free_port()
    extra = ["--served-model-name", "tiny-m3", "--health-interval", "1", "--default-max-tokens", "16"]
    cmd = gateway_command(
        [real_worker[0]], str(tiny_checkpoint), "127.0.0.1", port, [*extra, "--admin-key", "adm"]
    )
    proc = ManagedProcess(
        "gateway", cmd, dict(os.environ), Path(tmp_path_factory.mktemp("gw")) / "gw.log"
    ).start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", [proc], 60)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_chat_plain_and_streamed(gateway):
    url, _ = gateway
    c = client(url)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    r = c.chat.completions.create(model="tiny-m3", messages=msgs, max_tokens=8, temperature=0)
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 5
    chunks = list(
        c.chat.completions.create(
            model="tiny-m3",
            messages=msgs,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    # greedy decoding: the streamed text equals the non-streamed text
    streamed = "".join(
        (ch.choices[0].delta.content or "") + (getattr(ch.choices[0].delta, "reasoning_content", None) or "")
        for ch in chunks
        if ch.choices
    )
    whole = (r.choices[0].message.content or "") + (
        getattr(r.choices[0].message, "reasoning_content", None) or ""
    )
    assert sorted(streamed) == sorted(whole)


def test_streamed_logprobs_match_whole(gateway):
    """Workers stream deltas (--incremental-streaming-output): each token's logprob arrives once, in order."""
    url, _ = gateway
    c = client(url)
    kw = dict(model="tiny-m3", messages=[{"role": "user", "content": "Count to five."}], max_tokens=12,
              temperature=0, logprobs=True, top_logprobs=2)
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert len(streamed) == chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in streamed)
    assert [t.token for t in streamed] == [t.token for t in whole.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole.choices[0].logprobs.content],
                                                          abs=1e-3)


def test_tools_logprobs_and_completions(gateway):
    url, _ = gateway
    c = client(url)
    tools = [
        {
            "type": "function",
            "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    r = c.chat.completions.create(
        model="tiny-m3",
        messages=[{"role": "user", "content": "time?"}],
        tools=tools,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        seed=3,
    )
    assert r.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    r = c.completions.create(model="tiny-m3", prompt="The sky is", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_errors_from_real_stack(gateway):
    url, _ = gateway
    r = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": "tiny-m3",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,not-base64!!"}}
                    ],
                }
            ],
        },
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "tiny-m3", "messages": [{"role": "user", "content": "word " * 200000}]},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    ok = client(url).chat.completions.create(
        model="tiny-m3", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.usage.completion_tokens >= 1


def test_anthropic_messages_plain_and_streamed(gateway):
    """/v1/messages through the anthropic client on the real stack (template, tokenizer, worker,
    parsers): a Message, its stream, and count_tokens agree."""
    import anthropic

    url, _ = gateway
    c = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "Say hello."}]
    kw = dict(model="tiny-m3", max_tokens=8, system="Be brief.", messages=msgs, extra_body={"temperature": 0})
    m = c.messages.create(**kw)
    assert m.id.startswith("msg_") and m.stop_reason in {"end_turn", "max_tokens"}
    assert m.usage.output_tokens == 8 or m.stop_reason == "end_turn"
    counted = c.messages.count_tokens(model="tiny-m3", system="Be brief.", messages=msgs)
    assert m.usage.input_tokens == counted.input_tokens
    with c.messages.stream(**kw) as s:
        streamed = s.get_final_message()
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens, streamed.stop_reason) == (
        m.usage.input_tokens,
        m.usage.output_tokens,
        m.stop_reason,
    )

    def texts(msg, kind):  # greedy decoding: the same reply, block for block up to whitespace
        return "".join(getattr(b, kind) for b in msg.content if b.type == kind).strip()

    assert texts(streamed, "text") == texts(m, "text") and texts(streamed, "thinking") == texts(m, "thinking")


def test_affinity_then_failover(gateway, real_worker):
    """A growing conversation reuses the real worker's radix cache turn after turn (the gateway's
    token ids are prefix-stable); a second worker joining does not steal it (prefix affinity); when
    the real worker is killed, the conversation fails over to the other one."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_worker import FakeWorker

    url, _ = gateway
    c = client(url)
    admin = {"x-admin-key": "adm"}
    history = [{"role": "system", "content": "You are a careful agent. " * 60}]

    def turn(i: int):
        history.append({"role": "user", "content": f"step {i}"})
        r = c.chat.completions.create(model="tiny-m3", messages=history, max_tokens=4, temperature=0)
        history.append({"role": "assistant", "content": r.choices[0].message.content or "ok"})
        return r

    cached = [turn(i).usage.prompt_tokens_details.cached_tokens for i in range(2)]
    assert cached[1] >= 256, cached  # the second turn hit the worker's radix cache
    fake = FakeWorker()
    try:
        assert httpx.post(url + "/admin/workers", json={"url": fake.url}, headers=admin).status_code == 201
        for i in range(2, 5):
            assert turn(i).usage.prompt_tokens_details.cached_tokens >= 256
        assert fake.requests == [], "the conversation stayed where its prefix is cached"
        real_worker[1].stop()
        r = turn(5)
        assert r.choices[0].message.content == "Hello from the f"  # 4 tokens of the fake reply
        assert len(fake.requests) == 1
        workers = httpx.get(url + "/admin/workers", headers=admin).json()["workers"]
        assert not next(w for w in workers if w["url"] == real_worker[0])["healthy"]
    finally:
        fake.stop()
