"""M3 output parsing in the gateway: reasoning split and tool calls, whole and streamed.

Streaming is checked at every split point of the text and token by token with the tiny
checkpoint's tokenizer (the way a worker's stream arrives); tool calls are also compared with
SGLang 0.5.23's own M3 parser (`MinimaxM3Detector`) on the same texts.
"""

from __future__ import annotations

import json

import pytest
from m3_tool_data import NS

g = pytest.importorskip("m3serve._gateway")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "zip": {"type": "string"},
                    "ratio": {"type": "number"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "filters": {
                        "type": "object",
                        "properties": {"paths": {"type": "array", "items": {"type": "string"}}, "limit": {"type": "integer"}},
                    },
                    "ids": {"type": "array", "items": {"type": "integer"}},
                },
            },
        },
    },
]


def tag(name: str, inner: str) -> str:
    return f"{NS}<{name}>{inner}{NS}</{name}>"


def call(name: str, *args: str) -> str:
    return f'{NS}<invoke name="{name}">\n' + "\n".join(args) + f"\n{NS}</invoke>\n"


REPLIES = {
    "reasoning+content": ("<mm:think>Think about 2+2 = 4.</mm:think>\n\nIt is 4.", "Think about 2+2 = 4.", "It is 4.", []),
    "one call": (
        "Checking.\n" + f"{NS}<tool_call>\n" + call("get_weather", tag("city", "Paris"), tag("days", "3"), tag("zip", "00501"))
        + f"{NS}</tool_call>",
        None,
        "Checking.\n",
        [("get_weather", {"city": "Paris", "days": 3, "zip": "00501"})],
    ),
    "two calls + nested": (
        "<mm:think>use tools</mm:think>"
        + f"{NS}<tool_call>\n"
        + call("get_weather", tag("city", "東京"), tag("metric", "true"), tag("ratio", "0.5"))
        + call(
            "search",
            tag("query", "a <b> & c"),
            tag("filters", tag("paths", tag("item", "src/") + tag("item", "kernels/")) + tag("limit", "10")),
            tag("ids", tag("item", "1") + tag("item", "2")),
        )
        + f"{NS}</tool_call>",
        "use tools",
        "",
        [
            ("get_weather", {"city": "東京", "metric": True, "ratio": 0.5}),
            ("search", {"query": "a <b> & c", "filters": {"paths": ["src/", "kernels/"], "limit": 10}, "ids": [1, 2]}),
        ],
    ),
    "spaced tags": (
        f"{NS} <tool_call>\n{NS} <invoke name=\"get_weather\">\n{NS} <days>2{NS} </days>\n{NS} </invoke>\n{NS} </tool_call>",
        None,
        "",
        [("get_weather", {"days": 2})],
    ),
}


def collect(deltas):
    content, reasoning, calls = "", None, {}
    for d in deltas:
        if d[0] == "content":
            content += d[1]
        elif d[0] == "reasoning":
            reasoning = (reasoning or "") + d[1]
        elif d[0] == "tool_call_start":
            calls[d[1]] = [d[3], ""]
        elif d[0] == "tool_call_arguments":
            calls[d[1]][1] += d[2]
    return content, reasoning, [(n, json.loads(a)) for _, (n, a) in sorted(calls.items())]


@pytest.mark.parametrize("name", list(REPLIES))
def test_whole_reply(name):
    text, reasoning, content, calls = REPLIES[name]
    got = g.parse_output(text, json.dumps(TOOLS))
    assert got["content"] == content
    assert got["reasoning_content"] == reasoning
    assert [(c["name"], json.loads(c["arguments"])) for c in got["tool_calls"]] == calls
    assert all(c["id"].startswith("call_") for c in got["tool_calls"])
    assert len({c["id"] for c in got["tool_calls"]}) == len(calls)


@pytest.mark.parametrize("name", list(REPLIES))
def test_every_split_point(name):
    text, reasoning, content, calls = REPLIES[name]
    for i in range(len(text) + 1):
        deltas = g.parse_output_stream([text[:i], text[i:]], json.dumps(TOOLS))
        assert collect(deltas) == (content, reasoning, calls), f"split at {i}"
    deltas = g.parse_output_stream(list(text), json.dumps(TOOLS))
    assert collect(deltas) == (content, reasoning, calls), "char by char"


@pytest.mark.parametrize("name", list(REPLIES))
def test_token_by_token_with_the_real_detokenizer(tiny_checkpoint, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text, reasoning, content, calls = REPLIES[name]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Incremental detokenization as a server does it: emit the new suffix of the decoded prefix.
    pieces, prev = [], ""
    for n in range(1, len(ids) + 1):
        cur = tok.decode(ids[:n], skip_special_tokens=False)
        if not cur.endswith("\ufffd"):
            pieces.append(cur[len(prev) :])
            prev = cur
    assert "".join(pieces) == text
    assert collect(g.parse_output_stream(pieces, json.dumps(TOOLS))) == (content, reasoning, calls)


def test_calls_start_before_the_block_ends():
    """A client sees the call's name as soon as its invoke tag is complete."""
    text = REPLIES["two calls + nested"][0]
    cut = text.index('name="search">') + len('name="search">')
    deltas = g.parse_output_stream([text[:cut]], json.dumps(TOOLS))
    # Everything up to the cut, plus what finish() adds for a truncated call.
    starts = [d for d in deltas if d[0] == "tool_call_start"]
    assert [s[3] for s in starts] == ["get_weather", "search"]


def test_prefilled_reasoning_and_disabled_reasoning():
    got = g.parse_output("step 1\nstep 2</mm:think>answer", None, True, True)
    assert (got["reasoning_content"], got["content"]) == ("step 1\nstep 2", "answer")
    got = g.parse_output("</mm:think>plain answer", None, False, False)
    assert (got["reasoning_content"], got["content"]) == (None, "plain answer")
    got = g.parse_output("<mm:think>x</mm:think>y", None, False, False)
    assert got["content"] == "<mm:think>x</mm:think>y"


def test_unknown_tool_and_no_schema_keep_text_values():
    text = f"{NS}<tool_call>{call('unknown', tag('n', '42'), tag('flag', 'false'))}{NS}</tool_call>"
    got = g.parse_output(text, None)
    assert [(c["name"], json.loads(c["arguments"])) for c in got["tool_calls"]] == [("unknown", {"n": "42", "flag": False})]


@pytest.mark.parametrize("name", ["one call", "two calls + nested", "spaced tags"])
def test_agrees_with_sglang_m3_parser(name):
    """Same names and arguments as SGLang 0.5.23's MinimaxM3Detector (non-streaming)."""
    detector_mod = pytest.importorskip("sglang.srt.function_call.minimax_m3")
    from sglang.srt.entrypoints.openai.protocol import Tool

    text = REPLIES[name][0]
    if "<mm:think>" in text:
        text = text.split("</mm:think>", 1)[1]
    tools = [Tool(**t) for t in TOOLS]
    upstream = detector_mod.MinimaxM3Detector().detect_and_parse(text, tools)
    ours = g.parse_output(text, json.dumps(TOOLS), False)
    assert [(c["name"], json.loads(c["arguments"])) for c in ours["tool_calls"]] == [
        (c.name, json.loads(c.parameters)) for c in upstream.calls
    ]
    assert ours["content"] == upstream.normal_text
