"""The Rust gateway's chat template + tokenization equals transformers' on a corpus of conversations.

Reference: `tokenizer.apply_chat_template` (text and ids) for text, and the HF M3 processor
(`MiniMaxM3VLProcessor`, which expands each image marker into start + N image tokens + end) for
conversations with images. The Rust side is `m3serve._gateway.Preprocessor` over the same tiny
checkpoint, given the OpenAI-shaped request (tool-call arguments as JSON text, as clients send them).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

g = pytest.importorskip("m3serve._gateway")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — «quoted» <b>bold</b> & more",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 16.0},
                    "units": {"type": "string", "enum": ["metric", "imperial"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_code",
            "description": "Search the repository",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "filters": {
                        "type": "object",
                        "properties": {"paths": {"type": "array", "items": {"type": "string"}}, "limit": {"type": "number"}},
                    },
                },
            },
        },
    },
]

TEXTS = [
    "What's the weather in Paris tomorrow?",
    "def main(argv: list[str]) -> int:\n    return run(parse(argv))\n",
    "Résumé: naïve café — 東京 and 🚀 rockets\ttabs  and   spaces",
    "",
    "Line one\n\nLine two with trailing space ",
    'JSON inside: {"a": [1, 2.5, true, null], "b": "x\\"y"}',
    "<mm:think> looks like a tag but is user text </mm:think>",
    "]<]minimax[>[<tool_call> user text that mimics the syntax",
]


def tiny_png(seed: int, w: int, h: int) -> str:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_conversation(rng: random.Random, with_images: bool) -> dict:
    """A random but valid agent conversation: optional system prompt, tools, tool calls with results,
    reasoning in earlier turns, images in user turns, and a thinking-mode kwarg."""
    messages: list[dict] = []
    if rng.random() < 0.6:
        messages.append({"role": "system", "content": rng.choice(TEXTS[:3]) or "Be brief."})
    n_turns = rng.randint(1, 4)
    for turn in range(n_turns):
        parts: list[dict] = [{"type": "text", "text": rng.choice(TEXTS)}]
        if with_images and rng.random() < 0.7:
            size = rng.choice([(28, 28), (60, 40), (90, 200), (300, 200)])
            parts.insert(rng.randint(0, 1), {"type": "image_url", "image_url": {"url": tiny_png(rng.randint(0, 99), *size)}})
        messages.append({"role": "user", "content": parts if (with_images or rng.random() < 0.5) else parts[0]["text"]})
        if turn == n_turns - 1:
            break
        assistant: dict = {"role": "assistant", "content": rng.choice(TEXTS[:5])}
        if rng.random() < 0.5:
            assistant["reasoning_content"] = "Let me think about " + rng.choice(TEXTS[:3])
        if rng.random() < 0.6:
            args = rng.choice(
                [
                    {"city": "Paris", "days": 3},
                    {"city": "東京", "units": "metric", "days": 1},
                    {"query": "sparse attention", "filters": {"paths": ["src/", "kernels/"], "limit": 2.5}},
                ]
            )
            name = "search_code" if "query" in args else "get_weather"
            assistant["tool_calls"] = [
                {"id": f"call_{turn}", "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
            ]
            if rng.random() < 0.5:
                assistant["content"] = None
            messages.append(assistant)
            messages.append({"role": "tool", "tool_call_id": f"call_{turn}", "content": json.dumps({"ok": True, "temp": 21.5})})
            messages.append({"role": "assistant", "content": "Done: " + rng.choice(TEXTS[:2])})
        else:
            messages.append(assistant)
    body: dict = {"model": "m3", "messages": messages}
    if rng.random() < 0.6:
        body["tools"] = TOOLS
    mode = rng.choice([None, "enabled", "disabled", "adaptive"])
    if mode:
        body["chat_template_kwargs"] = {"thinking_mode": mode}
    return body


def hf_messages(body: dict) -> list[dict]:
    """What an HF template receives: tool-call arguments as mappings."""
    msgs = copy.deepcopy(body["messages"])
    for m in msgs:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return msgs


def decode_data_url(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    from transformers import AutoProcessor, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint), AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def pre(tiny_checkpoint):
    return g.Preprocessor(str(tiny_checkpoint))


def hf_render(tok, body: dict) -> str:
    return tok.apply_chat_template(
        hf_messages(body),
        tools=body.get("tools"),
        add_generation_prompt=True,
        tokenize=False,
        **body.get("chat_template_kwargs", {}),
    )


@pytest.mark.parametrize("seed", range(40))
def test_text_conversations_match_transformers(hf, pre, seed):
    tok, _ = hf
    body = make_conversation(random.Random(seed), with_images=False)
    want_text = hf_render(tok, body)
    want_ids = tok(want_text, add_special_tokens=False)["input_ids"]
    got = pre.prepare_chat(json.dumps(body))
    assert got["text"] == want_text
    assert got["input_ids"] == want_ids
    assert got["prompt_tokens"] == len(want_ids)
    mode = body.get("chat_template_kwargs", {}).get("thinking_mode")
    assert got["reasoning_prefilled"] == (mode == "enabled")


def test_apply_chat_template_tokenize_agrees(hf, pre):
    """The ids also equal apply_chat_template(tokenize=True), HF's own end-to-end path."""
    tok, _ = hf
    body = make_conversation(random.Random(1234), with_images=False)
    body["tools"] = TOOLS
    ids = tok.apply_chat_template(
        hf_messages(body), tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert pre.prepare_chat(json.dumps(body))["input_ids"] == list(ids)


@pytest.mark.parametrize("seed", range(12))
def test_image_conversations_match_the_hf_processor(hf, pre, seed):
    tok, processor = hf
    body = make_conversation(random.Random(1000 + seed), with_images=True)
    text = hf_render(tok, body)
    urls = [
        p["image_url"]["url"]
        for m in body["messages"]
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image_url"
    ]
    got = pre.prepare_chat(json.dumps(body))
    assert got["text"] == text
    if not urls:
        assert got["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        return
    want = processor(text=[text], images=[decode_data_url(u) for u in urls], return_tensors="np")
    assert got["input_ids"] == want["input_ids"][0].tolist()
    assert [list(g_) for g_ in got["image_grid_thw"]] == want["image_grid_thw"].tolist()
    # PNG input: decode and resize are bit-exact, so the pixels are too.
    pixels = np.frombuffer(got["pixel_values"], np.float32).reshape(got["pixel_shape"])
    np.testing.assert_array_equal(pixels, want["pixel_values"])


def test_render_chat_module_function(tiny_checkpoint, hf):
    tok, _ = hf
    body = {"messages": [{"role": "user", "content": "hi"}]}
    text, ids = g.render_chat(str(tiny_checkpoint), json.dumps(body))
    assert text == hf_render(tok, body)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_template_errors_are_client_errors(pre):
    with pytest.raises(ValueError, match=r"400: .*role .*not one of"):
        pre.prepare_chat(json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    with pytest.raises(ValueError, match="400: .*not valid JSON"):
        pre.prepare_chat("{not json")
    with pytest.raises(ValueError, match=r"400: .*image_url.url is required"):
        pre.prepare_chat(json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}))


def test_completion_prompt(hf, pre):
    tok, _ = hf
    got = pre.prepare_completion(json.dumps({"prompt": "The agent reads the repository"}))
    assert got["input_ids"] == tok("The agent reads the repository")["input_ids"]
    assert pre.prepare_completion(json.dumps({"prompt": [5, 6, 7]}))["input_ids"] == [5, 6, 7]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pre.prepare_completion(json.dumps({"prompt": [10**9]}))


def test_prompt_longer_than_the_context_is_a_client_error(tiny_checkpoint):
    pre = g.Preprocessor(str(tiny_checkpoint), json.dumps({"max_prompt_tokens": 10}))
    with pytest.raises(ValueError, match=r"^400: the prompt has \d+ tokens, more than the limit of 10$"):
        pre.prepare_chat(json.dumps({"messages": [{"role": "user", "content": "a long enough question"}]}))
    with pytest.raises(ValueError, match="more than the limit of 10"):
        pre.prepare_completion(json.dumps({"prompt": list(range(11))}))
