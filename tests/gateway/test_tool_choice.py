"""`tool_choice` "required" / a named function is enforced with constrained decoding.

The gateway builds an EBNF grammar of M3's tool-call block (`m3serve._gateway.tool_call_grammar`,
the same function the server uses) and hands it to the worker as SGLang's `ebnf` sampling param.
Here the grammar is checked with xgrammar itself (SGLang's grammar backend), then end to end: the
tiny random-weights M3 on a real CPU worker, which never calls a tool on its own, must return a
parsed tool call of an allowed function, streamed and not.
"""

from __future__ import annotations

import json

import httpx
import pytest
from m3_tool_data import NS, WEATHER_TOOL

g = pytest.importorskip("m3serve._gateway")

TOOLS = [
    WEATHER_TOOL,
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
    {"type": "function", "function": {"name": 'odd "name"', "parameters": {"type": "object"}}},
]


def tag(name: str, inner: str) -> str:
    return f"{NS}<{name}>{inner}{NS}</{name}>"


def block(*calls: str) -> str:
    return f"{NS}<tool_call>\n" + "".join(calls) + f"{NS}</tool_call>"


def call(name: str, *args: str) -> str:
    body = "".join(a + "\n" for a in args)
    return f'{NS}<invoke name="{name}">\n{body}{NS}</invoke>\n'


def accepts(grammar: str, text: str) -> bool:
    xgt = pytest.importorskip("xgrammar.testing")
    return xgt._is_grammar_accept_string(grammar, text)


WEATHER = call("get_weather", tag("city", "Paris ]x[ <b>"), tag("days", "3"))
TIME = call("get_time")


@pytest.mark.parametrize(
    "text, ok",
    [
        (block(WEATHER), True),
        (block(TIME, WEATHER, call('odd "name"', tag("anything", "[1, [2]]"))), True),
        ("\n" + block(TIME), True),
        (
            block(call('odd "name"', tag("filters", tag("paths", tag("item", "src/")) + tag("limit", "10")))),
            True,
        ),
        ("Sure! " + block(TIME), False),  # no text before the calls
        (block(TIME) + " done", False),  # nor after them
        (block(), False),  # at least one call
        (block(call("get_date")), False),  # only declared tools
        (block(call("get_weather", tag("country", "FR"))), False),  # only declared arguments
        (block(call("get_weather", tag("city", "a]<b"))), False),  # values cannot hold a tag start
        ("<mm:think>hmm</mm:think>" + block(TIME), False),  # thinking disabled by the prompt
    ],
)
def test_required_grammar(text: str, ok: bool) -> None:
    grammar = g.tool_call_grammar(json.dumps(TOOLS), None, True, "closed")
    assert accepts(grammar, text) is ok


def test_named_and_single_call_grammar() -> None:
    grammar = g.tool_call_grammar(json.dumps(TOOLS), "get_time", False, "closed")
    assert accepts(grammar, block(TIME))
    assert not accepts(grammar, block(TIME, TIME))  # parallel_tool_calls=false: one call
    assert not accepts(grammar, block(WEATHER))
    grammar = g.tool_call_grammar(json.dumps(TOOLS), "get_time", True, "closed")
    assert accepts(grammar, block(TIME, TIME))


@pytest.mark.parametrize(
    "reasoning, text, ok",
    [
        ("open", "a < b, </mm:thin, <</mm:think>\n" + block(TIME), True),
        ("open", block(TIME), False),  # the template opened <mm:think>: it must be closed first
        ("open", "x</mm:think> y </mm:think>" + block(TIME), False),  # text after the reasoning
        ("optional", "<mm:think>plan</mm:think>\n" + block(TIME), True),
        ("optional", block(TIME), True),
        ("optional", "plan</mm:think>" + block(TIME), False),
    ],
)
def test_reasoning_before_the_calls(reasoning: str, text: str, ok: bool) -> None:
    grammar = g.tool_call_grammar(json.dumps(TOOLS), None, True, reasoning)
    assert accepts(grammar, text) is ok


# --- end to end: gateway + real CPU worker (fixtures from test_gateway_real_workers) ---

import test_gateway_real_workers as real  # noqa: E402

# This module's own worker + gateway, started the same way (module-scoped fixtures).
real_worker = real.real_worker
gateway = real.gateway
client = real.client

E2E_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
    {
        "type": "function",
        "function": {"name": "get_date", "parameters": {"type": "object", "properties": {}}},
    },
    TOOLS[0],
]
MSGS = [{"role": "user", "content": "What time is it?"}]
# thinking disabled: the grammar then starts with the calls (a random model would not close a
# reasoning section in a few tokens); one call per reply keeps the forced path short.
EXTRA = {"chat_template_kwargs": {"thinking_mode": "disabled"}}


def create(url: str, **kw):
    args = dict(
        model="tiny-m3", messages=MSGS, tools=E2E_TOOLS, max_tokens=80, temperature=0, extra_body=EXTRA
    )
    args.update(kw)
    return client(url).chat.completions.create(**args)


def streamed_calls(chunks) -> tuple[dict[int, dict], str | None, str]:
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for ch in chunks:
        if not ch.choices:
            continue
        c = ch.choices[0]
        content += c.delta.content or ""
        for tc in c.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            if tc.function.name:
                entry["name"] += tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = c.finish_reason or finish
    return calls, finish, content


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_unconstrained_model_does_not_call(gateway):
    r = create(gateway[0], tool_choice="auto", max_tokens=24)
    assert not r.choices[0].message.tool_calls


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "tool_choice, allowed",
    [
        ("required", {"get_time", "get_date"}),
        ({"type": "function", "function": {"name": "get_date"}}, {"get_date"}),
    ],
)
def test_forced_tool_call(gateway, tool_choice, allowed):
    tools = E2E_TOOLS[:2] if tool_choice == "required" else E2E_TOOLS
    r = create(gateway[0], tools=tools, tool_choice=tool_choice, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert not (choice.message.content or "").strip()
    assert len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name in allowed
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {}

    chunks = create(gateway[0], tools=tools, tool_choice=tool_choice, parallel_tool_calls=False, stream=True)
    calls, finish, content = streamed_calls(chunks)
    assert finish == "tool_calls" and not content.strip()
    assert [c["name"] for c in calls.values()] == [choice.message.tool_calls[0].function.name]
    assert json.loads(calls[0]["arguments"]) == {}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_forced_parallel_calls(gateway):
    """Parallel calls allowed (the default): every call names one of the tools."""
    r = create(gateway[0], tools=E2E_TOOLS[:2], tool_choice="required", max_tokens=200)
    choice = r.choices[0]
    assert choice.message.tool_calls, choice
    assert {c.function.name for c in choice.message.tool_calls} <= {"get_time", "get_date"}
    assert choice.finish_reason in {"tool_calls", "length"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tool_choice_conflicts_with_other_constraints(gateway):
    for extra in ({"response_format": {"type": "json_object"}}, {"ebnf": 'root ::= "x"'}, {"regex": "x+"}):
        body = {"model": "tiny-m3", "messages": MSGS, "tools": E2E_TOOLS, "tool_choice": "required", **extra}
        r = httpx.post(gateway[0] + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "tool_choice" and err["type"] == "invalid_request_error"
        assert next(iter(extra)).split("_")[0] in err["message"]
