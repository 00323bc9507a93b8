"""The workload generator: shared prefix, unique sessions, turn structure, lengths, images, bad input."""

from __future__ import annotations

import base64
import io

import pytest

from m3bench.text import WORDS, TokenizerCounter, WordCounter, make_counter
from m3bench.workload import WorkloadSpec, make_sessions, shared_prefix, warmup_messages

SPEC = WorkloadSpec(prefix_tokens=300, user_tokens=20, tool_result_tokens=30, turns=3, output_tokens=4)


def test_prefix_is_shared_and_seeded():
    c = WordCounter()
    a = make_sessions(SPEC, c, 3, salt="run1")
    b = make_sessions(SPEC, c, 2, salt="run2")
    prefixes = {s.messages()[0]["content"] for s in a + b}
    assert len(prefixes) == 1
    prefix = prefixes.pop()
    assert len(prefix.split()) == 300 and set(prefix.split()) <= set(WORDS)
    assert warmup_messages(SPEC, c)[0]["content"] == prefix
    assert shared_prefix(WorkloadSpec(prefix_tokens=300, seed=1), c) != prefix


def test_sessions_are_unique_and_deterministic():
    c = WordCounter()
    tasks = [s.messages()[1]["content"] for s in make_sessions(SPEC, c, 4)]
    assert len(set(tasks)) == 4
    assert tasks == [s.messages()[1]["content"] for s in make_sessions(SPEC, c, 4)]
    # another salt (sweep point, repeat) gives other sessions, so they are not cached from a previous run
    assert tasks[0] != make_sessions(SPEC, c, 1, salt="other")[0].messages()[1]["content"]
    assert all(len(t.split()) == 20 for t in tasks)


def test_turns_append_answer_and_tool_result():
    c = WordCounter()
    s = make_sessions(SPEC, c, 1)[0]
    m1 = s.messages()
    assert [m["role"] for m in m1] == ["system", "user"]
    assert s.estimated_prompt_tokens == 320
    s.add_answer("answer one")
    m2 = s.messages()
    assert [m["role"] for m in m2] == ["system", "user", "assistant", "user"]
    assert m2[:2] == m1 and m2[2]["content"] == "answer one"
    assert m2[3]["content"] == s.tool_results[0] and len(m2[3]["content"].split()) == 30
    assert s.estimated_prompt_tokens == 320 + 2 + 30
    s.add_answer("answer two")
    m3 = s.messages()
    assert len(m3) == 6 and m3[:4] == m2 and m3[5]["content"] == s.tool_results[1]
    s.add_answer("answer three")
    assert s.done
    with pytest.raises(RuntimeError, match="all 3 turns"):
        s.messages()
    with pytest.raises(RuntimeError, match="after the last turn"):
        s.add_answer("too many")


@pytest.mark.parametrize("field,value", [("turns", 0), ("output_tokens", 0), ("prefix_tokens", -1),
                                         ("user_tokens", 0), ("images_per_turn", -2)])
def test_bad_spec_names_the_field(field, value):
    spec = WorkloadSpec(**{field: value})
    with pytest.raises(ValueError, match=field):
        make_sessions(spec, WordCounter(), 1)


def test_zero_sessions_rejected():
    with pytest.raises(ValueError, match="sessions"):
        make_sessions(SPEC, WordCounter(), 0)


def test_images_are_seeded_pngs_in_content_parts():
    from PIL import Image

    spec = WorkloadSpec(prefix_tokens=5, user_tokens=3, tool_result_tokens=3, turns=2, images_per_turn=2,
                        image_width=40, image_height=24)
    s0, s1 = make_sessions(spec, WordCounter(), 2)
    parts = s0.messages()[1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    urls = [p["image_url"]["url"] for p in parts[1:]]
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    img = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert img.size == (40, 24)
    assert urls[0] != urls[1]  # distinct images within a turn
    assert s1.messages()[1]["content"][1]["image_url"]["url"] != urls[0]  # and across sessions
    again = make_sessions(spec, WordCounter(), 1)[0].messages()[1]["content"][1]["image_url"]["url"]
    assert again == urls[0]
    s0.add_answer("ok")
    assert s0.messages()[3]["content"][1]["type"] == "image_url"  # tool results carry images too


def test_tokenizer_counter_gives_exact_lengths(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    # A small byte-level BPE trained here, like real checkpoints' tokenizers: words split into pieces.
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 5, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    counter = make_counter(str(tmp_path))
    assert isinstance(counter, TokenizerCounter) and counter.exact
    s = make_sessions(WorkloadSpec(prefix_tokens=257, user_tokens=31, tool_result_tokens=5, turns=2), counter, 1)[0]
    assert counter.count(s.messages()[0]["content"]) == 257
    assert counter.count(s.messages()[1]["content"]) == 31
    assert len(s.messages()[0]["content"].split()) < 257  # pieces, not words: the tokenizer did the counting


def test_tokenizer_path_must_exist(tmp_path):
    with pytest.raises(SystemExit, match="no tokenizer.json"):
        make_counter(str(tmp_path / "missing"))
