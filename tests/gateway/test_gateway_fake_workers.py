"""End-to-end tests of the Rust gateway through the official `openai` client, in front of fake
SGLang workers (tests/gateway/fake_worker.py): API shape, streaming, parsing, errors, routing
affinity, failover, breaker, overload, client disconnects, admin API."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from conftest import MODEL, wait_until
from m3_tool_data import NS, WEATHER_TOOL

TOOLS = [WEATHER_TOOL]
TOOL_REPLY = (
    f'<mm:think>Need the weather.</mm:think>Let me check.{NS}<tool_call>\n{NS}<invoke name="get_weather">\n'
    f"{NS}<city>Paris{NS}</city>\n{NS}<days>3{NS}</days>\n{NS}</invoke>\n{NS}</tool_call>"
)

pytestmark = pytest.mark.timeout(120)


def client(gw, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)


def chat(c, content="Hi there", **kw):
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_chat_non_streaming_maps_fields_and_reports_usage(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url])
    r = chat(
        client(gw), temperature=0.3, top_p=0.9, max_tokens=50, stop=["END"], seed=11, extra_body={"top_k": 5}
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == "Hello from the fake worker."
    assert r.choices[0].finish_reason == "stop"
    prompt = "<|user|>\nHi there\n<|assistant|>\n"
    assert r.usage.prompt_tokens == len(prompt.encode())
    assert r.usage.completion_tokens == 7  # 27 chars in 4-char pieces
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    sent = w.requests[-1]
    assert sent["input_ids"] == list(prompt.encode())
    sp = sent["sampling_params"]
    assert (
        sp["temperature"],
        sp["top_p"],
        sp["max_new_tokens"],
        sp["stop"],
        sp["sampling_seed"],
        sp["top_k"],
    ) == (0.3, 0.9, 50, ["END"], 11, 5)
    assert sp["skip_special_tokens"] is False and sent["stream"] is False and sent["rid"]


def test_chat_streaming_with_include_usage(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url])
    chunks = list(chat(client(gw), stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake worker."
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("incremental", [False, True])
def test_streaming_works_with_cumulative_and_incremental_workers(fake_workers, start_gateway, incremental):
    (w,) = fake_workers(1)
    w.configure(reply="abcdefghij" * 5, piece_chars=3, incremental=incremental)
    gw = start_gateway([w.url])
    chunks = list(chat(client(gw), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "abcdefghij" * 5


def test_reasoning_and_tool_calls_non_streaming(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    w.configure(reply=TOOL_REPLY)
    gw = start_gateway([w.url])
    r = chat(client(gw), "Weather in Paris?", tools=TOOLS)
    m = r.choices[0].message
    assert m.reasoning_content == "Need the weather."
    assert m.content == "Let me check."
    assert r.choices[0].finish_reason == "tool_calls"
    assert m.tool_calls[0].function.name == "get_weather"
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}
    assert m.tool_calls[0].id.startswith("call_")


@pytest.mark.parametrize("piece_chars", [1, 5])
def test_reasoning_and_tool_calls_streaming_token_by_token(fake_workers, start_gateway, piece_chars):
    (w,) = fake_workers(1)
    w.configure(reply=TOOL_REPLY, piece_chars=piece_chars)
    gw = start_gateway([w.url])
    chunks = list(chat(client(gw), "Weather?", tools=TOOLS, stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or []:
            d = calls.setdefault(tc.index, {"name": "", "args": "", "id": None})
            d["id"] = d["id"] or tc.id
            d["name"] += (tc.function.name or "") if tc.function else ""
            d["args"] += (tc.function.arguments or "") if tc.function else ""
    assert reasoning == "Need the weather." and content == "Let me check."
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["args"]) == {"city": "Paris", "days": 3}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert NS not in content


def test_tool_choice_none_keeps_text(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    w.configure(reply=f"{NS}<tool_call>x")
    gw = start_gateway([w.url])
    r = chat(client(gw), tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == f"{NS}<tool_call>x"


def test_logprobs_n_and_response_format(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = chat(
        client(gw),
        logprobs=True,
        top_logprobs=2,
        n=3,
        seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    lp = r.choices[0].logprobs.content
    assert len(lp) == 7 and lp[0].token == "Hell" and len(lp[0].top_logprobs) == 2
    assert abs(lp[0].logprob + 0.1) < 1e-9
    assert r.usage.completion_tokens == 21
    sent = w.requests[-3:]
    assert sorted(b["sampling_params"]["sampling_seed"] for b in sent) == [5, 6, 7]
    assert json.loads(sent[0]["sampling_params"]["json_schema"]) == schema
    assert all(b["return_logprob"] and b["top_logprobs_num"] == 2 for b in sent)
    # json_object -> a generic object schema
    chat(client(gw), response_format={"type": "json_object"})
    assert json.loads(w.requests[-1]["sampling_params"]["json_schema"]) == {"type": "object"}


def test_streaming_logprobs_and_n(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url])
    chunks = list(chat(client(gw), stream=True, n=2, logprobs=True, stream_options={"include_usage": True}))
    per = {0: "", 1: ""}
    tokens = 0
    for c in chunks:
        for ch in c.choices:
            per[ch.index] += ch.delta.content or ""
            tokens += len(ch.logprobs.content) if ch.logprobs else 0
    assert per == {0: "Hello from the fake worker.", 1: "Hello from the fake worker."}
    assert tokens == 14
    assert chunks[-1].usage.completion_tokens == 14


def test_length_finish_and_completions_endpoint(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url])
    c = client(gw)
    r = chat(c, max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "Hell" + "o fr"
    r = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, logprobs=1)
    assert r.object == "text_completion" and r.choices[0].text == "Hello from t"
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].logprobs.tokens == ["Hell", "o fr", "om t"]
    assert w.requests[-1]["input_ids"] == list(b"Once upon")
    assert "skip_special_tokens" not in w.requests[-1]["sampling_params"]
    text = "".join(
        ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt=[1, 2, 3], stream=True)
    )
    assert text == "Hello from the fake worker."
    assert w.requests[-1]["input_ids"] == [1, 2, 3]


def test_models_health_metrics(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url], "--context-length", "4096")
    models = client(gw).models.list()
    assert [m.id for m in models.data] == [MODEL]
    h = httpx.get(gw.url + "/health").json()
    assert h["healthy_workers"] == 1
    chat(client(gw))
    text = gw.metrics()
    for name in [
        "m3gw_requests_total",
        "m3gw_time_to_first_token_seconds_bucket",
        "m3gw_preprocess_seconds_bucket",
        "m3gw_worker_in_flight",
        "m3gw_routing_decisions_total",
        "m3gw_prompt_tokens_total",
        "m3gw_inter_token_latency_seconds_bucket",
        "m3gw_affinity_matched_tokens_total",
    ]:
        assert name in text, name
    assert 'm3gw_requests_total{route="chat_completions",status="200"} 1' in text
    # structured logs: one JSON object per line with the request's numbers
    done = [json.loads(line) for line in gw.log().splitlines() if '"request done"' in line]
    assert done and done[-1]["completion_tokens"] == 7


def test_bad_input_gets_4xx_and_gateway_keeps_serving(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url], "--context-length", "200", "--max-body-mb", "0.01")
    url = gw.url + "/v1/chat/completions"
    ok_body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

    def post(body, **kw):
        return httpx.post(
            url, content=body if isinstance(body, bytes) else json.dumps(body), timeout=10, **kw
        )

    cases = [
        (b"{not json", 400, None),
        ({**ok_body, "model": "gpt-4"}, 404, "model"),
        ({**ok_body, "temperature": 9}, 400, "temperature"),
        ({**ok_body, "messages": []}, 400, "messages"),
        ({"model": MODEL}, 400, "messages"),
        ({**ok_body, "messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),
        ({**ok_body, "max_tokens": 190}, 400, "max_tokens"),
        (json.dumps({**ok_body, "pad": "y" * 20000}).encode(), 413, None),
        ({**ok_body, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ]
    for body, status, param in cases:
        r = post(body)
        assert r.status_code == status, (body if isinstance(body, dict) else body[:40], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param
    assert (
        post({**ok_body, "messages": [{"role": "user", "content": "x" * 300}]}).json()["error"]["code"]
        == "context_length_exceeded"
    )
    r = httpx.get(gw.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # The openai client maps them to its exception types.
    with pytest.raises(openai.NotFoundError):
        client(gw).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        chat(client(gw), temperature=-1)
    # ... and normal traffic still works.
    assert post(ok_body).status_code == 200
    assert gw.proc.poll() is None


def test_concurrent_bad_and_good_clients(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    w.configure(token_delay=0.01)
    gw = start_gateway([w.url])
    results: list[int] = []

    def good():
        results.append(len(chat(client(gw)).choices))

    def bad():
        r = httpx.post(gw.url + "/v1/chat/completions", content=b'{"model": ', timeout=10)
        results.append(r.status_code)

    threads = [threading.Thread(target=good if i % 2 else bad) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [1] * 10 + [400] * 10


def test_api_keys(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url], "--api-key", "secret-1", env={"M3SERVE_API_KEY": "secret-2"})
    with pytest.raises(openai.AuthenticationError):
        chat(client(gw, key="wrong"))
    assert chat(client(gw, key="secret-1")).choices
    assert chat(client(gw, key="secret-2")).choices
    r = httpx.get(gw.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(gw.url + "/health").status_code == 200  # probes need no key


def test_worker_client_error_is_passed_through(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    w.configure(status=400, error_message="input too long for this worker")
    gw = start_gateway([w.url])
    with pytest.raises(openai.BadRequestError) as e:
        chat(client(gw))
    assert "input too long for this worker" in str(e.value)


def test_prefix_affinity_and_sessions(fake_workers, start_gateway):
    workers = fake_workers(3)
    gw = start_gateway([w.url for w in workers])
    c = client(gw)
    system = "You are an agent. " * 40  # ~750 prompt tokens in bytes mode: 5 full 128-token chunks
    for conv in range(3):
        history = [{"role": "system", "content": f"[conv {conv}] " + system}]
        for turn in range(4):
            history.append({"role": "user", "content": f"turn {turn}"})
            r = c.chat.completions.create(model=MODEL, messages=history)
            history.append({"role": "assistant", "content": r.choices[0].message.content})
            if turn > 0:  # the worker that served the previous turns has the prefix cached
                assert r.usage.prompt_tokens_details.cached_tokens >= 640, (conv, turn)

    def convs(w) -> list[str]:
        return [bytes(b["input_ids"][:20]).decode(errors="replace").split("]")[0] for b in w.requests]

    owners = {}
    for i, w in enumerate(workers):
        for tag in convs(w):
            owners.setdefault(tag, set()).add(i)
    assert len(owners) == 3 and all(len(o) == 1 for o in owners.values()), owners  # every turn on one worker
    assert len({next(iter(o)) for o in owners.values()}) == 3, "cold conversations spread over idle workers"
    assert gw.metric("m3gw_affinity_matched_tokens_total") >= 9 * 640
    # session header: sticky even for unrelated short prompts
    for i in range(4):
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"q{i}"}],
            extra_headers={"x-session-id": "agent-7"},
        )
    assert sorted(len(w.requests) for w in workers) == [4, 4, 8]


def test_failover_when_a_worker_dies(fake_workers, start_gateway):
    a, b = fake_workers(2)
    gw = start_gateway([a.url, b.url], "--health-interval", "30")
    c = client(gw)
    for i in range(4):
        chat(c, f"warm {i}")
    a.stop()
    for i in range(10):
        r = chat(c, f"after {i}")
        assert r.choices[0].message.content == "Hello from the fake worker."
    assert gw.metric("m3gw_upstream_retries_total") >= 1
    assert len(b.requests) >= 10


def test_breaker_opens_on_failing_worker(fake_workers, start_gateway):
    a, b = fake_workers(2)
    a.configure(status=500)
    gw = start_gateway(
        [a.url, b.url], "--breaker-threshold", "2", "--breaker-open-secs", "60", "--health-interval", "60"
    )
    c = client(gw)
    codes = []
    for i in range(12):
        try:
            chat(c, f"q{i}")
            codes.append(200)
        except openai.APIStatusError as e:
            codes.append(e.status_code)
    assert codes.count(502) == 2, codes  # two failures open the breaker, then only b serves
    assert codes[-6:] == [200] * 6
    workers = httpx.get(gw.url + "/admin/workers").status_code
    assert workers == 403  # admin disabled without a key
    assert 'm3gw_worker_breaker_open{worker="' + a.url + '"} 1' in gw.metrics()


def test_no_worker_and_overload(fake_workers, start_gateway):
    gw = start_gateway([], "--admin-key", "adm", expect_ready=False)
    r = httpx.post(
        gw.url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    assert r.status_code == 503 and r.headers["retry-after"]
    assert httpx.get(gw.url + "/health").status_code == 503

    (w,) = fake_workers(1)
    w.configure(first_delay=1.5)
    gw2 = start_gateway([w.url], "--max-inflight-per-worker", "1")
    statuses: list[int] = []

    def call():
        r = httpx.post(
            gw2.url + "/v1/chat/completions",
            timeout=10,
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"

    ts = [threading.Thread(target=call) for _ in range(3)]
    for t in ts:
        t.start()
        time.sleep(0.1)
    for t in ts:
        t.join(15)
    assert sorted(statuses) == [200, 429, 429]


def test_upstream_timeout_is_504(fake_workers, start_gateway):
    (w,) = fake_workers(1)
    w.configure(hang=True)
    gw = start_gateway([w.url], "--upstream-timeout", "1")
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        timeout=10,
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert w.wait_for_abort(), "the hung request is aborted on the worker"


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_on_worker(fake_workers, start_gateway, stream):
    (w,) = fake_workers(1)
    w.configure(reply="x" * 400, piece_chars=1, first_delay=0.3 if not stream else 0.0, token_delay=0.05)
    gw = start_gateway([w.url])
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "stream": stream}
    with httpx.Client(timeout=10) as h:
        if stream:
            with h.stream("POST", gw.url + "/v1/chat/completions", json=body) as r:
                for _ in zip(range(3), r.iter_lines(), strict=False):
                    pass
        else:
            with pytest.raises(httpx.ReadTimeout):
                h.post(gw.url + "/v1/chat/completions", json=body, timeout=0.5)
    aborted = w.wait_for_abort(10)
    assert aborted == [w.requests[-1]["rid"]]
    assert wait_until(lambda: gw.metric("m3gw_client_disconnects_total") == 1, 5)


def test_admin_api_adds_and_removes_workers(fake_workers, start_gateway):
    a, b = fake_workers(2)
    gw = start_gateway([a.url], "--admin-key", "adm")
    hdr = {"Authorization": "Bearer adm"}
    assert httpx.get(gw.url + "/admin/workers").status_code == 401
    r = httpx.post(gw.url + "/admin/workers", json={"url": b.url}, headers=hdr)
    assert r.status_code == 201 and r.json()["worker"]["source"] == "admin"
    assert httpx.post(gw.url + "/admin/workers", json={"url": b.url}, headers=hdr).status_code == 200
    assert httpx.post(gw.url + "/admin/workers", json={"url": "ftp://x"}, headers=hdr).status_code == 400
    urls = [x["url"] for x in httpx.get(gw.url + "/admin/workers", headers=hdr).json()["workers"]]
    assert urls == [a.url, b.url]
    r = httpx.request("DELETE", gw.url + "/admin/workers", json={"url": a.url}, headers=hdr)
    assert r.status_code == 200
    for i in range(3):
        chat(client(gw), f"x{i}")
    assert len(a.requests) == 0 and len(b.requests) == 3
    r = httpx.delete(gw.url + "/admin/workers", params={"url": a.url}, headers={"x-admin-key": "adm"})
    assert r.status_code == 404


class FakeKubeApi:
    """A fake Kubernetes API server: GET /api/v1/namespaces/{ns}/pods?labelSelector=... returns
    `self.pods`; records the requests so the test can check the selector and the bearer token."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.pods: list[dict] = []
        self.seen: list[tuple[str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                api.seen.append((self.path, self.headers.get("authorization", "")))
                data = json.dumps({"kind": "PodList", "items": api.pods}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @staticmethod
    def pod(name: str, port: int, ready: bool = True) -> dict:
        return {
            "metadata": {"name": name, "annotations": {"m3serve.io/port": str(port)}},
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }


def test_kubernetes_pod_discovery(fake_workers, start_gateway, tmp_path):
    a, b = fake_workers(2)
    api = FakeKubeApi()
    token = tmp_path / "token"
    token.write_text("sa-token-123\n")
    api.pods = [api.pod("w-a", a.port), api.pod("w-b", b.port, ready=False)]
    gw = start_gateway(
        [],
        "--k8s-selector",
        "app=m3-worker",
        "--k8s-namespace",
        "serving",
        "--k8s-api-server",
        api.url,
        "--k8s-poll-interval",
        "0.2",
        "--k8s-token-path",
        str(token),
        "--admin-key",
        "adm",
        expect_ready=False,
    )
    hdr = {"x-admin-key": "adm"}

    def urls() -> list[str]:
        return sorted(w["url"] for w in httpx.get(gw.url + "/admin/workers", headers=hdr).json()["workers"])

    assert wait_until(lambda: urls() == [a.url], 10), urls()
    path, auth = api.seen[-1]
    assert path.startswith("/api/v1/namespaces/serving/pods?labelSelector=app%3Dm3-worker")
    assert auth == "Bearer sa-token-123"
    assert chat(client(gw)).choices[0].message.content
    api.pods = [api.pod("w-a", a.port), api.pod("w-b", b.port)]  # b becomes ready
    assert wait_until(lambda: urls() == sorted([a.url, b.url]), 10)
    api.pods = [api.pod("w-b", b.port)]  # a goes away
    assert wait_until(lambda: urls() == [b.url], 10)
    for i in range(3):
        chat(client(gw), f"k{i}")
    assert len(b.requests) == 3
    api.server.shutdown()  # API server down: the gateway keeps its current workers
    time.sleep(0.6)
    assert urls() == [b.url]


def test_model_mode_sends_template_tokens_and_image_handoff(fake_workers, start_gateway, tiny_checkpoint):
    """Production prompt mode (the checkpoint's template, tokenizer and image processor in Rust) in
    front of a fake worker: the worker gets exactly the preprocessor's token ids and the image
    hand-off, the reply is parsed, and a broken image is a 400 naming the image."""
    import base64
    import io

    from PIL import Image

    from m3serve import _gateway

    (w,) = fake_workers(1)
    w.configure(reply="<mm:think>Looks like a square.</mm:think>A red square.")
    gw = start_gateway([w.url], model_mode="model", model_path=str(tiny_checkpoint))
    buf = io.BytesIO()
    Image.new("RGB", (56, 84), (200, 10, 10)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    r = client(gw).chat.completions.create(model=MODEL, messages=messages)
    _, ids = _gateway.render_chat(str(tiny_checkpoint), json.dumps({"model": MODEL, "messages": messages}))
    sent = w.requests[-1]
    assert sent["input_ids"] == list(ids)
    assert r.usage.prompt_tokens == len(ids)
    handoff = sent["image_data"]  # one preprocessed-pixels data URL per image (preprocess/handoff.rs)
    assert len(handoff) == 1 and handoff[0].startswith("data:application/x-m3serve-pixels;")
    assert r.choices[0].message.content == "A red square."
    bad = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}],
        }
    ]
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).chat.completions.create(model=MODEL, messages=bad)
    assert "image" in str(e.value).lower()
    assert len(w.requests) == 1  # the bad request never reached the worker


def test_sigterm_lets_open_streams_finish(fake_workers, start_gateway):
    import signal

    (w,) = fake_workers(1)
    w.configure(reply="y" * 40, piece_chars=1, token_delay=0.03)
    gw = start_gateway([w.url], "--shutdown-grace", "10")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    text = ""
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=20) as r:
        lines = r.iter_lines()
        next(lines)
        gw.proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    for line in rest:
        if line.startswith("data: {"):
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    assert text == "y" * 40 and [line for line in rest if line][-1] == "data: [DONE]"
    assert gw.proc.wait(15) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(gw.url + "/liveness", timeout=2)


def test_sticky_session_spills_when_its_worker_is_overloaded(fake_workers, start_gateway):
    a, b = fake_workers(2)
    for w in (a, b):
        w.configure(first_delay=1.0)
    gw = start_gateway([a.url, b.url], "--balance-abs-threshold", "2", "--balance-rel-threshold", "1.5")

    def call() -> None:
        httpx.post(
            gw.url + "/v1/chat/completions",
            timeout=20,
            headers={"x-session-id": "one-agent"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        )

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # arrive one after another, so the gateway sees the growing load
    for t in threads:
        t.join(20)
    counts = sorted([len(a.requests), len(b.requests)])
    # Sticky up to 3 in flight (0 + 2 < 3 and 3 > 1.5 * 0), then the overflow goes to the idle worker.
    assert counts[0] >= 2 and sum(counts) == 8, counts
    assert gw.metric('m3gw_routing_decisions_total{reason="spill"}') >= 1


def test_busy_worker_whose_health_check_times_out_stays_in_routing(fake_workers, start_gateway):
    """A long prefill can hold SGLang's event loop past the health timeout; that worker is busy, not dead."""
    (w,) = fake_workers(1)
    gw = start_gateway([w.url], "--health-interval", "0.3", "--health-timeout", "0.2",
                       "--health-failure-threshold", "1")
    w.configure(first_delay=2.5, health_delay=1.0)
    c = client(gw)
    slow = threading.Thread(target=lambda: chat(c, "long prefill"))
    slow.start()
    time.sleep(1.5)  # several health checks time out while the slow request is in flight
    assert httpx.get(gw.url + "/health", timeout=5).status_code == 200
    slow.join(10)
    # Idle and still not answering in time: now it is a failed check, and the worker leaves routing.
    assert wait_until(lambda: httpx.get(gw.url + "/health", timeout=5).status_code == 503, 10)


def test_special_tokens_in_a_reply_never_reach_the_client(fake_workers, start_gateway, tiny_checkpoint):
    """The worker keeps special tokens for the parsers; turn ends, role markers and image placeholders
    must still be cut, or the next turn's history would carry an image placeholder without an image."""
    (w,) = fake_workers(1)
    w.configure(reply="Hi]<]image[>[ there.[e~[", piece_chars=3)
    gw = start_gateway([w.url], model_mode="model", model_path=str(tiny_checkpoint))
    c = client(gw)
    messages = [{"role": "user", "content": "hello"}]
    r = c.chat.completions.create(model=MODEL, messages=messages)
    assert r.choices[0].message.content == "Hi there."
    stream = c.chat.completions.create(model=MODEL, messages=messages, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == "Hi there."
    # The reply, sent back as history, is a valid next turn (no stray placeholder).
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "more"}]
    assert c.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content == "Hi there."
