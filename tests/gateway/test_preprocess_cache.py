"""The tokenization segment cache gives exactly the ids of a full tokenization, and reuses the prefix.

The cache cuts the rendered prompt after special tokens (turn ends, role markers) and caches each
segment's ids; these tests grow agent conversations turn by turn and compare every turn with an
uncached encode and with the HF tokenizer.
"""

from __future__ import annotations

import json
import random

import pytest

g = pytest.importorskip("m3serve._gateway")

WORDS = "the agent reads repository plans change calls tool reports found def main return 0 1 2 128 é 東京 🚀 { } [ ] : , \n".split(" ")


def random_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def grow_conversation(rng: random.Random, turns: int):
    """Yield request bodies of an agent loop: each adds an assistant tool call, its result and a user turn."""
    messages = [{"role": "system", "content": "You are a coding agent. " + random_text(rng, 50)}]
    messages.append({"role": "user", "content": random_text(rng, 80)})
    for t in range(turns):
        yield {"messages": list(messages), "chat_template_kwargs": {"thinking_mode": "enabled"}}
        messages.append(
            {
                "role": "assistant",
                "content": random_text(rng, 10),
                "reasoning_content": random_text(rng, 20),
                "tool_calls": [
                    {"id": f"c{t}", "type": "function", "function": {"name": "run", "arguments": json.dumps({"cmd": random_text(rng, 5)})}}
                ],
            }
        )
        messages.append({"role": "tool", "tool_call_id": f"c{t}", "content": random_text(rng, rng.randint(5, 400))})
        if rng.random() < 0.3:
            messages.append({"role": "user", "content": random_text(rng, 30)})


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("seed", range(4))
def test_cached_ids_equal_full_tokenization_every_turn(tiny_checkpoint, tok, seed):
    pre = g.Preprocessor(str(tiny_checkpoint))
    rng = random.Random(seed)
    previous_hits = 0
    for turn, body in enumerate(grow_conversation(rng, 12)):
        got = pre.prepare_chat(json.dumps(body))
        text = got["text"]
        assert got["input_ids"] == pre.encode(text, use_cache=False), f"turn {turn}"
        assert got["input_ids"] == tok(text, add_special_tokens=False)["input_ids"], f"turn {turn}"
        stats = pre.cache_stats()
        if turn >= 2:
            # Later turns reuse the earlier turns' segments.
            assert stats["hit_tokens"] > previous_hits, f"turn {turn}: no cache hits"
        previous_hits = stats["hit_tokens"]
    stats = pre.cache_stats()
    assert stats["hit_tokens"] > stats["miss_tokens"], stats


def test_adversarial_boundaries(tiny_checkpoint, tok):
    """Text around special tokens that BPE could merge across if the cut were wrong."""
    pre = g.Preprocessor(str(tiny_checkpoint))
    specials = ["]~b]", "[e~[", "]~!b[", "]<]image[>[", "<mm:think>", "]<]minimax[>["]
    rng = random.Random(7)
    for _ in range(200):
        pieces = []
        for _ in range(rng.randint(1, 12)):
            pieces.append(rng.choice(specials) if rng.random() < 0.4 else random_text(rng, rng.randint(0, 30)))
            if rng.random() < 0.3:
                pieces.append(rng.choice(["", " ", "\n", "  ", "e~[", "]~", "["]))
        text = "".join(pieces)
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert pre.encode(text, use_cache=True) == want, repr(text)
        assert pre.encode(text, use_cache=True) == want, repr(text)  # second time from the cache


def test_cache_can_be_disabled(tiny_checkpoint):
    pre = g.Preprocessor(str(tiny_checkpoint), json.dumps({"cache_max_tokens": 0}))
    body = next(grow_conversation(random.Random(0), 1))
    pre.prepare_chat(json.dumps(body))
    pre.prepare_chat(json.dumps(body))
    assert pre.cache_stats()["hit_tokens"] == 0


def test_sessions_starting_together_encode_each_segment_once(tiny_checkpoint):
    """8 requests of one new conversation at once (agent sessions starting on a shared prefix): every segment is
    encoded by one of them, the others wait for its ids (single flight), and all get the full ids."""
    import threading

    *_, body = grow_conversation(random.Random(11), 30)  # the last turn: the longest conversation
    request = json.dumps(body)
    alone = g.Preprocessor(str(tiny_checkpoint))
    want = alone.prepare_chat(request)["input_ids"]
    once = alone.cache_stats()["miss_tokens"]
    pre = g.Preprocessor(str(tiny_checkpoint))
    barrier = threading.Barrier(8)
    got = []

    def session():
        barrier.wait()
        got.append(pre.prepare_chat(request)["input_ids"])

    threads = [threading.Thread(target=session) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 8
    stats = pre.cache_stats()
    assert stats["miss_tokens"] == once, stats  # without single flight, concurrent misses encode again
    assert stats["hit_tokens"] + stats["coalesced_tokens"] > 0, stats
