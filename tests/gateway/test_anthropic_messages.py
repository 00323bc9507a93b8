"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) on the Rust gateway,
through the official `anthropic` client, in front of fake SGLang workers: the translation onto the
chat route (prompt, sampling, tools, images, history), the Message and its stream, stop reasons,
Anthropic's error shape and exception classes, x-api-key auth, metrics and client disconnects."""

from __future__ import annotations

import base64
import io
import json

import anthropic
import httpx
import openai
import pytest
from conftest import MODEL, wait_until
from m3_tool_data import NS, WEATHER_TOOL

TOOL = {
    "name": "get_weather",
    "description": "Weather forecast for a city.",
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}
# The same tool as the chat route takes it (key order as the translation writes it).
OPENAI_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL["name"],
        "description": TOOL["description"],
        "parameters": TOOL["input_schema"],
    },
}
TOOL_REPLY = (
    f'<mm:think>Need the weather.</mm:think>Let me check.{NS}<tool_call>\n{NS}<invoke name="get_weather">\n'
    f"{NS}<city>Paris{NS}</city>\n{NS}<days>3{NS}</days>\n{NS}</invoke>\n{NS}</tool_call>"
)
HELLO = "Hello from the fake worker."

pytestmark = pytest.mark.timeout(120)


def client(gw, key: str | None = "none", **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=30, **kw)


def ask(c, content="Hi there", max_tokens=50, **kw):
    return c.messages.create(
        model=MODEL, max_tokens=max_tokens, messages=[{"role": "user", "content": content}], **kw
    )


def events(gw, body: dict, headers: dict | None = None) -> list[tuple[str, dict]]:
    """The raw SSE of a streamed request: (event name, data) pairs; asserts each event line pairs."""
    out = []
    with httpx.stream(
        "POST", gw.url + "/v1/messages", json={**body, "stream": True}, headers=headers, timeout=30
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name, (name, data)
                out.append((name, data))
                name = None
    return out


def test_plain_message_maps_fields_and_reports_usage(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url])
    r = ask(
        client(gw),
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": " Really."}],
        # Sampling fields of the wire format (older SDKs and other clients send them; this SDK
        # version no longer has them as arguments).
        extra_body={"temperature": 0.3, "top_p": 0.9, "top_k": 5},
        stop_sequences=["END"],
        metadata={"user_id": "session-42"},
    )
    assert r.id.startswith("msg_") and r.type == "message" and r.role == "assistant" and r.model == MODEL
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == HELLO
    assert (r.stop_reason, r.stop_sequence) == ("end_turn", None)
    prompt = "<|system|>\nBe brief. Really.\n<|user|>\nHi there\n<|assistant|>\n"
    assert r.usage.input_tokens == len(prompt.encode())
    assert r.usage.output_tokens == 7  # 27 chars in 4-char pieces
    assert r._request_id  # the `request-id` header Anthropic's SDKs read
    sent = w.requests[-1]
    assert sent["input_ids"] == list(prompt.encode()) and sent["stream"] is False
    sp = sent["sampling_params"]
    assert (sp["temperature"], sp["top_p"], sp["top_k"], sp["max_new_tokens"], sp["stop"]) == (
        0.3,
        0.9,
        5,
        50,
        ["END"],
    )
    assert sp["skip_special_tokens"] is False  # the chat route's parsing needs the markers
    text = gw.metrics()
    assert 'm3gw_requests_total{route="messages",status="200"} 1' in text
    assert 'm3gw_preprocess_seconds_count{route="messages"} 1' in text
    assert 'm3gw_request_duration_seconds_count{route="messages"} 1' in text
    assert gw.metric("m3gw_completion_tokens_total") == 7


def test_streamed_text_event_sequence(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url])
    with client(gw).messages.stream(
        model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "Hi there"}]
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == HELLO
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == HELLO
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 7
    assert final.usage.input_tokens == len(b"<|user|>\nHi there\n<|assistant|>\n")
    assert w.requests[-1]["stream"] is True

    ev = events(gw, {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]})
    names = [n for n, _ in ev]
    deltas = names.count("content_block_delta")
    assert names == ["message_start", "content_block_start"] + ["content_block_delta"] * deltas + [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert deltas == 7
    start = ev[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert ev[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert ev[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert ev[-2][1]["usage"]["output_tokens"] == 7


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_becomes_a_thinking_block(fake_workers, start_gateway, stream):
    (w,) = fake_workers(1)
    w.configure(reply="<mm:think>2 plus 2 is 4.</mm:think>The answer is 4.", piece_chars=3)
    gw = start_gateway([w.url])
    c = client(gw)
    kw = dict(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "2+2?"}])
    if stream:
        with c.messages.stream(**kw) as s:
            thinking = "".join(e.thinking for e in s if e.type == "thinking")
            m = s.get_final_message()
        assert thinking == "2 plus 2 is 4."
    else:
        m = c.messages.create(**kw)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert (m.content[0].thinking, m.content[0].signature) == ("2 plus 2 is 4.", "")
    assert m.content[1].text == "The answer is 4."
    assert m.stop_reason == "end_turn"


def test_tool_call_non_streamed(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    w.configure(reply=TOOL_REPLY)
    gw = start_gateway([w.url])
    m = ask(client(gw), "Weather in Paris?", max_tokens=500, tools=[TOOL])
    assert [b.type for b in m.content] == ["thinking", "text", "tool_use"]
    call = m.content[2]
    assert call.name == "get_weather" and call.input == {"city": "Paris", "days": 3} and call.id
    assert m.content[1].text == "Let me check." and m.stop_reason == "tool_use"
    # tool_choice `any` and `tool` are enforced like the chat route's `required` / named function.
    sent = w.requests[-1]["sampling_params"]
    assert "ebnf" not in sent
    ask(client(gw), "Weather?", max_tokens=500, tools=[TOOL], tool_choice={"type": "any"})
    assert "get_weather" in w.requests[-1]["sampling_params"]["ebnf"]
    m = ask(
        client(gw),
        "Weather?",
        max_tokens=500,
        tools=[TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert m.stop_reason == "tool_use"
    assert "get_weather" in w.requests[-1]["sampling_params"]["ebnf"]
    # `none`: the model does not see the tools, and tool syntax stays text.
    w.configure(reply=f"{NS}<tool_call>x")
    m = ask(client(gw), "Weather?", tools=[TOOL], tool_choice={"type": "none"})
    assert [b.type for b in m.content] == ["text"] and m.stop_reason == "end_turn"


@pytest.mark.parametrize("piece_chars", [1, 5])
def test_tool_call_streamed_token_by_token(fake_workers, start_gateway, piece_chars):
    (w,) = fake_workers(1)
    w.configure(reply=TOOL_REPLY, piece_chars=piece_chars)
    gw = start_gateway([w.url])
    body = {
        "model": MODEL,
        "max_tokens": 500,
        "tools": [TOOL],
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    }
    ev = events(gw, body)
    starts = [d["content_block"] for n, d in ev if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use"]
    assert starts[2]["name"] == "get_weather" and starts[2]["input"] == {}
    assert [d["index"] for n, d in ev if n == "content_block_start"] == [0, 1, 2]
    partial = "".join(
        d["delta"]["partial_json"] for n, d in ev if n == "content_block_delta" and d["index"] == 2
    )
    assert json.loads(partial) == {"city": "Paris", "days": 3}
    text = "".join(d["delta"].get("text", "") for n, d in ev if n == "content_block_delta")
    assert text == "Let me check." and NS not in text
    assert ev[-2][1]["delta"]["stop_reason"] == "tool_use"
    # The SDK's own accumulation gives the parsed input.
    with client(gw).messages.stream(**body) as s:
        m = s.get_final_message()
    assert m.content[2].type == "tool_use" and m.content[2].input == {"city": "Paris", "days": 3}
    assert m.stop_reason == "tool_use"


def test_tool_result_history_renders_as_the_chat_route(fake_workers, start_gateway, tiny_checkpoint):
    """Production prompt mode: a conversation with thinking, text, tool_use and tool_result blocks
    gives the worker exactly the tokens of the same conversation sent to /v1/chat/completions."""
    (w,) = fake_workers(1)
    w.configure(reply="Still sunny.")
    gw = start_gateway([w.url], model_mode="model", model_path=str(tiny_checkpoint))
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Need the weather.", "signature": "abc"},
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "get_weather",
                    "input": {"city": "Paris", "days": 3},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01",
                    "content": [{"type": "text", "text": "Sunny, 21C"}],
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    m = client(gw).messages.create(
        model=MODEL, max_tokens=20, system="You are a weather agent.", tools=[TOOL], messages=history
    )
    assert m.content[0].text == "Still sunny." and m.stop_reason == "end_turn"
    ours = w.requests[-1]["input_ids"]
    oc = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
    oc.chat.completions.create(
        model=MODEL,
        max_tokens=20,
        tools=[OPENAI_TOOL],
        messages=[
            {"role": "system", "content": "You are a weather agent."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "reasoning_content": "Need the weather.",
                "tool_calls": [
                    {
                        "id": "toolu_01",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": json.dumps({"city": "Paris", "days": 3}),
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01", "content": "Sunny, 21C"},
            {"role": "user", "content": "And tomorrow?"},
        ],
    )
    assert ours == w.requests[-1]["input_ids"]
    assert m.usage.input_tokens == len(ours)
    # count_tokens measures that same prompt.
    n = client(gw).messages.count_tokens(
        model=MODEL, system="You are a weather agent.", tools=[TOOL], messages=history
    )
    assert n.input_tokens == len(ours)
    assert len(w.requests) == 2, "count_tokens does not reach a worker"


def test_base64_image_matches_the_chat_route(fake_workers, start_gateway, tiny_checkpoint):
    from PIL import Image

    (w,) = fake_workers(1)
    w.configure(reply="<mm:think>Looks like a square.</mm:think>A red square.")
    gw = start_gateway([w.url], model_mode="model", model_path=str(tiny_checkpoint))
    buf = io.BytesIO()
    Image.new("RGB", (56, 84), (200, 10, 10)).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    m = client(gw).messages.create(
        model=MODEL,
        max_tokens=50,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
                ],
            }
        ],
    )
    assert [b.type for b in m.content] == ["thinking", "text"] and m.content[1].text == "A red square."
    ours = w.requests[-1]
    assert len(ours["image_data"]) == 1 and ours["image_data"][0].startswith(
        "data:application/x-m3serve-pixels;"
    )
    oc = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
    url = "data:image/png;base64," + data
    oc.chat.completions.create(
        model=MODEL,
        max_tokens=50,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    )
    theirs = w.requests[-1]
    assert ours["input_ids"] == theirs["input_ids"] and ours["image_data"] == theirs["image_data"]
    # A broken image is the chat route's 400, in Anthropic's shape.
    bad = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}}
    with pytest.raises(anthropic.BadRequestError) as e:
        ask(client(gw), [bad])
    assert "image" in e.value.message.lower() and e.value.body["error"]["type"] == "invalid_request_error"
    assert len(w.requests) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_and_max_tokens(fake_workers, start_gateway, stream):
    (w,) = fake_workers(1)
    w.configure(reply="Hello there. END of story.")
    gw = start_gateway([w.url])
    c = client(gw)

    def final(**kw):
        if not stream:
            return ask(c, **kw)
        with c.messages.stream(model=MODEL, messages=[{"role": "user", "content": "Hi"}], **kw) as s:
            return s.get_final_message()

    m = final(max_tokens=50, stop_sequences=["STOP", "END"])
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "END")
    assert m.content[0].text == "Hello there. "
    m = final(max_tokens=2)
    assert (m.stop_reason, m.stop_sequence) == ("max_tokens", None)
    assert m.content[0].text == "Hello th" and m.usage.output_tokens == 2
    m = final(max_tokens=50, stop_sequences=["never"])
    assert (m.stop_reason, m.stop_sequence) == ("end_turn", None)


def test_errors_in_anthropic_shape(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url], "--max-body-mb", "0.01")
    c = client(gw)
    msgs = [{"role": "user", "content": "Hi"}]

    def post(body):
        r = httpx.post(gw.url + "/v1/messages", json=body, timeout=10)
        err = r.json()
        assert set(err) == {"type", "error"} and err["type"] == "error", err
        assert set(err["error"]) == {"type", "message"} and err["error"]["message"]
        return r.status_code, err["error"]["type"], err["error"]["message"]

    # max_tokens is required (the SDK's signature requires it too, so this goes round it).
    with pytest.raises(anthropic.BadRequestError) as e:
        c.post("/v1/messages", cast_to=object, body={"model": MODEL, "messages": msgs})
    assert "max_tokens" in e.value.message and e.value.body["error"]["type"] == "invalid_request_error"
    assert post({"model": MODEL, "messages": msgs})[:2] == (400, "invalid_request_error")
    # A block type the translation does not know.
    with pytest.raises(anthropic.BadRequestError) as e:
        ask(c, [{"type": "video", "source": {"type": "url", "url": "https://x/y.mp4"}}])
    assert "video" in e.value.message
    with pytest.raises(anthropic.BadRequestError):
        ask(c, [{"type": "image", "source": {"type": "file", "file_id": "f_1"}}])
    with pytest.raises(anthropic.BadRequestError):
        ask(c, tools=[{"type": "web_search_20250305", "name": "web_search"}])
    with pytest.raises(anthropic.NotFoundError) as e:
        c.messages.create(model="not-served", max_tokens=10, messages=msgs)
    assert e.value.body["error"]["type"] == "not_found_error" and MODEL in e.value.message
    with pytest.raises(anthropic.NotFoundError):
        c.messages.count_tokens(model="not-served", messages=msgs)
    # The chat route's own checks answer in this shape too.
    assert post({"model": MODEL, "max_tokens": 10, "messages": msgs, "temperature": 9})[:2] == (
        400,
        "invalid_request_error",
    )
    status, kind, _ = post(
        {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 20000}]}
    )
    assert (status, kind) == (413, "request_too_large")
    with pytest.raises(anthropic.ContentTooLargeError):
        ask(c, "y" * 20000)
    r = httpx.post(gw.url + "/v1/messages", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # Worker failures: the status the chat route gives them.
    w.configure(status=400, error_message="input too long for this worker")
    with pytest.raises(anthropic.BadRequestError) as e:
        ask(c)
    assert "input too long for this worker" in e.value.message
    w.configure(status=500)
    with pytest.raises(anthropic.InternalServerError) as e:
        ask(c)
    assert e.value.status_code == 502 and e.value.body["error"]["type"] == "api_error"
    # The OpenAI routes keep OpenAI's shape.
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "nope", "messages": msgs}, timeout=10)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert gw.proc.poll() is None


def test_no_worker_is_overloaded_error_with_retry_after(start_gateway):
    gw = start_gateway([], "--admin-key", "adm", expect_ready=False)
    r = httpx.post(
        gw.url + "/v1/messages",
        json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.ServiceUnavailableError):
        ask(client(gw))


def test_api_keys_as_x_api_key_or_bearer(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url], "--api-key", "secret-1")
    with pytest.raises(anthropic.AuthenticationError) as e:
        ask(client(gw, key="wrong"))
    assert e.value.body["error"]["type"] == "authentication_error"
    assert ask(client(gw, key="secret-1")).content[0].text == HELLO  # x-api-key
    assert ask(client(gw, key=None, auth_token="secret-1")).content[0].text == HELLO  # Bearer
    with pytest.raises(anthropic.AuthenticationError):
        client(gw, key="wrong").messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
    r = httpx.post(
        gw.url + "/v1/messages",
        json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 401 and "x-api-key" in r.json()["error"]["message"]
    # x-api-key stays an Anthropic-route header: the OpenAI routes want Bearer.
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        headers={"x-api-key": "secret-1"},
    )
    assert r.status_code == 401
    assert len(w.requests) == 2


def test_count_tokens_equals_input_tokens(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url])
    c = client(gw)
    kw = dict(system="Be brief.", messages=[{"role": "user", "content": "How many tokens?"}])
    n = c.messages.count_tokens(model=MODEL, **kw)
    assert n.input_tokens == len(b"<|system|>\nBe brief.\n<|user|>\nHow many tokens?\n<|assistant|>\n")
    assert c.messages.create(model=MODEL, max_tokens=5, **kw).usage.input_tokens == n.input_tokens
    assert 'm3gw_requests_total{route="count_tokens",status="200"} 1' in gw.metrics()


def test_client_disconnect_aborts_on_worker(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    w.configure(reply="x" * 400, piece_chars=1, token_delay=0.05)
    gw = start_gateway([w.url])
    body = {
        "model": MODEL,
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "long"}],
        "stream": True,
    }
    with httpx.Client(timeout=10) as h, h.stream("POST", gw.url + "/v1/messages", json=body) as r:
        for _ in zip(range(6), r.iter_lines(), strict=False):
            pass
    assert w.wait_for_abort(10) == [w.requests[-1]["rid"]]
    assert wait_until(lambda: gw.metric("m3gw_client_disconnects_total") == 1, 5)
