"""The tiny checkpoint's tokenizer: byte-level BPE with MiniMax-M3's special tokens.

The strings are M3's (m3_architecture.md §7.5 and §8); the ids are the tiny vocabulary's own, recorded
in config.json and tokenizer files (one source of truth), never hard-coded elsewhere.
Role markers, turn ends and image placeholders are *special* (skipped when decoding); the reasoning tags
and the tool-call namespace marker are plain added tokens so they survive detokenization and reach the
gateway's reasoning and tool-call parsers.
"""

from __future__ import annotations

SPECIAL_TOKENS = {
    "bos": "]~!b[",
    "role": "]~b]",
    "eos": "[e~[",
    "pad": "]!p~[",
    "image_start": "]<]start of image[>[",
    "image_end": "]<]end of image[>[",
    "image": "]<]image[>[",
    "video": "]<]video[>[",
}
# Added but not special: they are part of the model's visible output.
TEXT_MARKERS = {
    "think_start": "<mm:think>",
    "think_end": "</mm:think>",
    "tool_ns": "]<]minimax[>[",
}

_CORPUS = """
The agent reads the repository, plans the change, calls a tool, and reports what it found.
def main(argv: list[str]) -> int:
    return run(parse(argv))
{"name": "get_weather", "arguments": {"location": "Paris", "days": 3}}
<tool_call> <invoke name="search"> <query>sparse attention kernels</query> </invoke> </tool_call>
<response>{"temperature": 21.5, "unit": "celsius", "ok": true}</response>
Hello! How can I help you today? I can summarize files, run tests, or explain code.
MiniMax-M3 uses block-sparse attention: each query selects sixteen blocks of 128 tokens.
0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 100 128 256 512 1024 2048 4096 65536
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
user assistant system developer tool image video think reasoning answer question
SELECT id, name FROM users WHERE created_at > '2026-01-01' ORDER BY id;
fn main() { println!("hello, world"); }   const x = await fetch(url); if (!x.ok) throw err;
"""


def _corpus() -> list[str]:
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    # Repetition weights common words so merges form; deterministic by construction.
    return lines * 8


def build_tokenizer(vocab_size: int):
    """Train the tiny tokenizer. Returns (tokenizers.Tokenizer, {role name: token id})."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TEXT_MARKERS),
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_MARKERS.values()])
    ids = {name: tok.token_to_id(text) for name, text in {**SPECIAL_TOKENS, **TEXT_MARKERS}.items()}
    missing = [name for name, i in ids.items() if i is None]
    if missing:  # pragma: no cover - would be a tokenizers behaviour change
        raise RuntimeError(f"tokenizer lost its special tokens {missing}")
    return tok, ids
