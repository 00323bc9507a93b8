"""Chat template + tokenization of a ~60k-token agent conversation: transformers vs the Rust gateway,
cold and with the gateway's tokenization prefix cache (the agent's next turn).

The checkpoint is the tiny M3 (chat template, special tokens) with its tokenizer retrained to a
realistic 32k byte-level BPE vocabulary, so "60k tokens" means about 200 kB of text.
Measured (median of runs, process pinned to one core, 1 torch/rayon thread):
  hf_cold:          tokenizer.apply_chat_template(..., tokenize=True)  (Jinja2 + HF fast tokenizer)
  rust_cold:        Preprocessor(cache off).prepare_chat(request JSON) (render + tokenize, from JSON text)
  rust_render:      Preprocessor.render(request JSON)                  (template only)
  rust_next_turn:   prepare_chat of turn N+1 after turn N was prepared (cache on; new tool result each run)
  rust_repeat:      the same request again (cache on)

Usage: python benchmarks/preprocess/bench_template.py [--tokens 60000] [--out benchmarks/results/preprocess_template]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

WORDS = (
    "the agent reads repository plans change calls tool reports found function return value error test "
    "passed failed kernel attention sparse block index query cache token worker gateway request response "
    "def class import self None True False for while if else elif try except raise with as yield lambda"
).split()


def text(rng: random.Random, n_words: int) -> str:
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        out.append(w if rng.random() > 0.1 else f"{w}_{rng.randint(0, 999)}")
        if i % 12 == 11:
            out.append(rng.choice(["\n", ".\n", "()\n    ", ": ", " = ", ", "]))
    return " ".join(out)


def corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [text(rng, 200) for _ in range(4000)]


def build_checkpoint(tiny: Path, out: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from m3serve.tokenizer_files import SPECIAL_TOKENS, TEXT_MARKERS

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "chat_template.jinja", "config.json", "preprocessor_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32000,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(1), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_MARKERS.values()])
    tok.save(str(out / "tokenizer.json"))
    return out


def conversation(target_tokens: int, count, seed: int = 0) -> dict:
    rng = random.Random(seed)
    tools = [
        {"type": "function", "function": {"name": name, "description": text(rng, 20),
         "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}, "timeout": {"type": "integer"}}}}}
        for name in ("run_shell", "read_file", "write_file", "search")
    ]
    messages = [{"role": "system", "content": "You are a coding agent. " + text(rng, 300)},
                {"role": "user", "content": text(rng, 150)}]
    body = {"model": "m3", "messages": messages, "tools": tools, "chat_template_kwargs": {"thinking_mode": "enabled"}}
    turn = 0
    while count(body) < target_tokens:
        messages.append({"role": "assistant", "content": text(rng, 15), "reasoning_content": text(rng, 40),
                         "tool_calls": [{"id": f"c{turn}", "type": "function", "function": {
                             "name": "run_shell", "arguments": json.dumps({"cmd": text(rng, 6), "timeout": 30})}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{turn}", "content": text(rng, rng.randint(100, 900))})
        turn += 1
    return body


def next_turn(body: dict, seed: int) -> dict:
    rng = random.Random(seed)
    b = json.loads(json.dumps(body))
    b["messages"].append({"role": "assistant", "content": text(rng, 15), "tool_calls": [{"id": "n", "type": "function",
                          "function": {"name": "read_file", "arguments": json.dumps({"cmd": text(rng, 4)})}}]})
    b["messages"].append({"role": "tool", "tool_call_id": "n", "content": text(rng, 400)})
    return b


def hf_messages(body: dict) -> list[dict]:
    msgs = json.loads(json.dumps(body["messages"]))
    for m in msgs:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return msgs


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=60000)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--out", default="benchmarks/results/preprocess_template")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    import transformers
    from transformers import AutoTokenizer

    import m3serve._gateway as g
    from m3serve.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-template-"))
    try:
        tiny = write_tiny_model(work / "tiny", seed=0)
        ckpt = build_checkpoint(Path(tiny), work / "ckpt32k")
        tok = AutoTokenizer.from_pretrained(ckpt)

        def hf_ids(body: dict) -> list[int]:
            return tok.apply_chat_template(hf_messages(body), tools=body["tools"], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, **body["chat_template_kwargs"])["input_ids"]

        cold = g.Preprocessor(str(ckpt), json.dumps({"cache_max_tokens": 0}))
        body = conversation(args.tokens, lambda b: len(cold.prepare_chat(json.dumps(b))["input_ids"]))
        request = json.dumps(body)
        ids = cold.prepare_chat(request)["input_ids"]
        assert ids == list(hf_ids(body)), "Rust and HF token ids differ"
        results = {
            "prompt_tokens": len(ids),
            "prompt_chars": len(cold.render(request)),
            "messages": len(body["messages"]),
            "hf_cold_ms": median_ms(lambda: hf_ids(body), args.runs),
            "rust_cold_ms": median_ms(lambda: cold.prepare_chat(request), args.runs),
            "rust_render_ms": median_ms(lambda: cold.render(request), args.runs),
        }
        cached = g.Preprocessor(str(ckpt))
        cached.prepare_chat(request)  # turn N, as the previous request of the agent
        turns = [json.dumps(next_turn(body, seed)) for seed in range(args.runs + 1)]
        assert cached.prepare_chat(turns[0])["input_ids"] == list(hf_ids(json.loads(turns[0])))
        times = []
        for t in turns[1:]:
            s = time.perf_counter()
            cached.prepare_chat(t)
            times.append(time.perf_counter() - s)
        results["rust_next_turn_ms"] = statistics.median(times) * 1e3
        results["rust_repeat_ms"] = median_ms(lambda: cached.prepare_chat(request), args.runs)
        results["cache_stats"] = cached.cache_stats()
        results["speedup_cold_vs_hf"] = results["hf_cold_ms"] / results["rust_cold_ms"]
        results["speedup_next_turn_vs_rust_cold"] = results["rust_cold_ms"] / results["rust_next_turn_ms"]
        results["speedup_next_turn_vs_hf"] = results["hf_cold_ms"] / results["rust_next_turn_ms"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in results.items()}
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} ({os.cpu_count()} logical CPUs), load average {os.getloadavg()[0]:.1f}",
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "gateway": g.version(),
        "tokenizer": "byte-level BPE, 32k vocab, M3 special tokens; tiny M3 chat template",
        "runs": args.runs,
        "pinned_cores": 1,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    r = results
    md = [
        "# Chat template + tokenization of a 60k-token agent conversation",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        f"Conversation: {r['messages']} messages, {r['prompt_tokens']} tokens, {r['prompt_chars']} characters "
        "(tools, reasoning, tool calls and results). Rust ids equal transformers' (checked).",
        "",
        "| path | ms |",
        "|---|---|",
        f"| transformers apply_chat_template(tokenize=True) | {r['hf_cold_ms']} |",
        f"| Rust, cold (cache off): render + tokenize from request JSON | {r['rust_cold_ms']} |",
        f"| Rust, template render only | {r['rust_render_ms']} |",
        f"| Rust, next agent turn with the prefix cache | {r['rust_next_turn_ms']} |",
        f"| Rust, identical request again | {r['rust_repeat_ms']} |",
        "",
        f"Speed-ups: Rust cold vs transformers x{r['speedup_cold_vs_hf']}; next turn with cache vs Rust cold "
        f"x{r['speedup_next_turn_vs_rust_cold']}; vs transformers x{r['speedup_next_turn_vs_hf']}.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
