"""One real SGLang worker (CPU, tiny M3, fp32) through `m3serve worker`; every test here talks to it.

The server prefills in chunks of 1,024 tokens (--chunked-prefill-size), so a 3,000-token prompt is
served as three extends whose later chunks read earlier blocks back from the paged pool, and every
query past position 2,048 sees more than 16 blocks: the index top-k really drops blocks.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
import torch

from m3serve.plugin.marker import read_all

PROMPT_LEN = 3000
DECODE_LEN = 16
CHUNK = 1024
LOGPROB_TOL = 1e-3
STREAM_LEN = 12


@pytest.fixture(scope="module")
def worker(tiny_checkpoint, tmp_path_factory, worker_factory):
    workdir = tmp_path_factory.mktemp("worker-e2e")
    args = ["--dtype", "float32", "--max-total-tokens", "24576", "--chunked-prefill-size", str(CHUNK),
            "--skip-server-warmup", "--enable-cache-report", "--log-level", "warning"]
    with worker_factory(tiny_checkpoint, workdir, args) as w:
        yield w


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from m3serve.hf_compat import load_text_model

    return load_text_model(tiny_checkpoint, dtype=torch.float32)


def _prompt(n: int, seed: int) -> list[int]:
    # Byte-level ids (3..258) avoid the special tokens; a fixed seed keeps the test deterministic.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=g).tolist()


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _token_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1."""
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _greedy(worker, ids, n=DECODE_LEN, **extra):
    return worker.generate(
        input_ids=ids,
        sampling_params={"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True},
        **extra,
    )


@pytest.fixture(scope="module")
def long_case(worker, hf_model):
    """A 3,000-token prompt served greedily by SGLang (with logprobs), and transformers' logits over
    prompt + SGLang's continuation (computed once, shared by the two tests below)."""
    ids = _prompt(PROMPT_LEN, seed=1)
    out = _greedy(worker, ids, return_logprob=True, logprob_start_len=0)
    full = ids + out["output_ids"]
    return ids, out, full, _hf_logits(hf_model, full)


def test_long_prompt_matches_transformers(long_case):
    """Prompt logprobs, greedy tokens and their logprobs match transformers' MiniMaxM3VLForCausalLM.

    Greedy equality is checked teacher-forced: every token SGLang picked is transformers' argmax given
    the same prefix, which by induction is exactly transformers' own greedy decode."""
    ids, out, full, logits = long_case
    meta = out["meta_info"]
    gen = out["output_ids"]
    assert len(gen) == DECODE_LEN
    want = _token_logprobs(logits, full)
    got_prompt = torch.tensor([lp for lp, _tok, _ in meta["input_token_logprobs"][1:]], dtype=torch.float32)
    got_gen = torch.tensor([lp for lp, _tok, _ in meta["output_token_logprobs"]], dtype=torch.float32)
    prompt_diff = (got_prompt - want[: PROMPT_LEN - 1]).abs().max().item()
    gen_diff = (got_gen - want[PROMPT_LEN - 1 :]).abs().max().item()
    hf_greedy = logits[PROMPT_LEN - 1 : -1].argmax(-1).tolist()
    print(f"max |logprob diff| prompt={prompt_diff:.2e} decode={gen_diff:.2e}; greedy sglang={gen} hf={hf_greedy}")
    assert prompt_diff < LOGPROB_TOL
    assert gen_diff < LOGPROB_TOL
    assert gen == hf_greedy


def test_block_selection_is_active(long_case, hf_model):
    """The same tokens under dense attention give different logprobs: selection really drops blocks
    (in prefill and in decode), so the parity test above checks sparse selection, not dense attention."""
    _ids, _out, full, logits = long_case
    sparse = _token_logprobs(logits, full)
    indexers = [layer.self_attn.indexer for layer in hf_model.model.layers if layer.self_attn.indexer is not None]
    assert indexers, "the tiny model has no sparse layer"
    saved = [ix.topk_blocks for ix in indexers]
    try:
        for ix in indexers:
            ix.topk_blocks = 10**6
        dense = _token_logprobs(_hf_logits(hf_model, full), full)
    finally:
        for ix, k in zip(indexers, saved):
            ix.topk_blocks = k
    early = (sparse[:2047] - dense[:2047]).abs().max().item()
    late = (sparse[2048 : PROMPT_LEN - 1] - dense[2048 : PROMPT_LEN - 1]).abs().max().item()
    decode = (sparse[PROMPT_LEN - 1 :] - dense[PROMPT_LEN - 1 :]).abs().max().item()
    print(f"sparse vs dense max diff: first 2,048 tokens {early:.2e}, later prompt {late:.2e}, decode {decode:.2e}")
    assert early < 1e-4  # at most 16 blocks visible: nothing to drop
    assert late > 1e-2
    assert decode > 1e-3


def test_plugin_ran_msa_kernels(worker):
    """The scheduler process recorded msa_kernels calls for sparse extend and decode, one plan per forward
    batch shared by every sparse layer, and the MoE layout fix."""
    _greedy(worker, _prompt(300, seed=2), n=4)
    config = json.loads((worker.model_path / "config.json").read_text())["text_config"]
    n_sparse = sum(config["sparse_attention_config"]["sparse_attention_freq"])
    snapshots = read_all(str(worker.marker_dir))
    model_proc = [s for s in snapshots if s["counts"].get("sparse_backend_init")]
    assert model_proc, f"no process built the sparse backend through the plugin: {snapshots}"
    counts = model_proc[0]["counts"]
    assert model_proc[0]["msa_kernels"].endswith("msa_kernels/__init__.py")
    assert counts.get("sparse_extend", 0) >= 1
    assert counts.get("sparse_decode", 0) >= 1
    assert counts.get("moe_halves_fix", 0) >= 1
    assert counts.get("sparse_kv_pool_allowed") == 1
    assert counts["sparse_extend"] + counts["sparse_decode"] == n_sparse * counts["plan_built"]
    # The CUDA platform's fused norm/rotary forwards: the CPU worker keeps SGLang's native forwards.
    assert "fused_ops_registered" not in model_proc[0]
    assert not counts.get("fused_norm") and not counts.get("fused_rotary")
    log = worker.log_path.read_text(errors="replace")
    assert "[m3serve] M3 sparse layers -> msa_kernels" in log


def test_radix_cache_same_prompt_twice(worker):
    """A repeated 700-token prompt reuses its full pages (5 x 128) and decodes exactly the same tokens."""
    ids = _prompt(700, seed=3)
    first = _greedy(worker, ids, return_logprob=True)
    second = _greedy(worker, ids, return_logprob=True)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == 640
    assert second["output_ids"] == first["output_ids"]
    a = [lp for lp, *_ in first["meta_info"]["output_token_logprobs"]]
    b = [lp for lp, *_ in second["meta_info"]["output_token_logprobs"]]
    assert max(abs(x - y) for x, y in zip(a, b)) < LOGPROB_TOL


def test_radix_cache_shared_prefix(worker):
    """Two prompts sharing a 600-token prefix: the second reuses the prefix's 4 full pages."""
    prefix = _prompt(600, seed=4)
    _greedy(worker, prefix + _prompt(50, seed=5), n=2)
    out = _greedy(worker, prefix + _prompt(80, seed=6), n=2)
    assert out["meta_info"]["cached_tokens"] == 512


def _chat(worker, messages, max_tokens=8):
    return worker.post("/v1/chat/completions", {
        "model": str(worker.model_path), "messages": messages, "max_tokens": max_tokens, "temperature": 0,
    })


def test_radix_cache_multi_turn_conversation(worker):
    """Turn 2 of a conversation reuses the cached pages of turn 1's prompt (usage.prompt_tokens_details)."""
    system = "You are a terse assistant. " + " ".join(f"rule {i}: answer with one word." for i in range(60))
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    r1 = _chat(worker, turn1)
    p1 = r1["usage"]["prompt_tokens"]
    assert p1 > 256, f"turn 1 prompt too short to fill pages: {p1} tokens"
    answer = r1["choices"][0]["message"]["content"] or "blue"
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And another?"}]
    r2 = _chat(worker, turn2)
    cached = (r2["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    print(f"turn 1 prompt {p1} tokens; turn 2 prompt {r2['usage']['prompt_tokens']} tokens, {cached} cached")
    assert cached >= (p1 // 128 - 1) * 128 and cached > 0


def _stream_generate(worker, ids, n, on_chunk=None, timeout=600):
    """Stream /generate; returns (output ids, finish reason, number of SSE chunks). m3serve workers stream
    deltas (--incremental-streaming-output): each event carries only its new ids, so they are joined here."""
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}}
    req = urllib.request.Request(worker.url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    chunks, last, ids_out = 0, None, []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            last = json.loads(line[5:])
            ids_out += last["output_ids"]
            chunks += 1
            assert len(ids_out) == last["meta_info"]["completion_tokens"], "events must carry deltas, in order"
            if on_chunk is not None and on_chunk(chunks) is False:
                return None, None, chunks
    return ids_out, last["meta_info"]["finish_reason"]["type"], chunks


def test_eight_concurrent_streams(worker):
    """8 streams at once each get their full greedy continuation, identical to the same prompt served alone."""
    prompts = [_prompt(60 + 7 * i, seed=100 + i) for i in range(8)]
    alone = [_greedy(worker, p, n=STREAM_LEN)["output_ids"] for p in prompts]
    results: list = [None] * 8
    errors: list = []

    def run(i):
        try:
            results[i] = _stream_generate(worker, prompts[i], STREAM_LEN)
        except Exception as e:  # surfaced below with the stream's index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for i, (ids, finish, chunks) in enumerate(results):
        assert finish == "length" and len(ids) == STREAM_LEN, (i, finish, ids)
        assert chunks >= 2, f"stream {i} was not streamed ({chunks} chunk)"
        assert ids == alone[i], f"stream {i} diverged from its single-request result"


def _running(worker) -> int:
    return sum(x["num_running_reqs"] + x["num_waiting_reqs"] for x in worker.get("/v1/loads")["loads"])


def test_abort_mid_stream_frees_slot(worker):
    """Closing a stream mid-generation aborts the request: the scheduler drops it and serves on."""
    assert _running(worker) == 0
    seen = {}

    def stop_after_three(n):
        if n == 3:
            seen["running"] = _running(worker)
            return False
        return True

    _stream_generate(worker, _prompt(200, seed=7), 4000, on_chunk=stop_after_three)
    assert seen["running"] == 1
    deadline = time.monotonic() + 60
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running(worker) == 0, "aborted request still holds its slot"
    assert len(_greedy(worker, _prompt(40, seed=8), n=4)["output_ids"]) == 4


def test_generate_and_openai_endpoints(worker):
    """SGLang's native /generate and the OpenAI-compatible endpoints all answer."""
    name = str(worker.model_path)
    out = worker.generate(text="Hello, world.", sampling_params={"max_new_tokens": 5, "temperature": 0})
    assert isinstance(out["text"], str) and out["meta_info"]["completion_tokens"] == 5

    models = worker.get("/v1/models")
    assert [m["id"] for m in models["data"]] == [name]

    comp = worker.post("/v1/completions", {"model": name, "prompt": "Once upon a time", "max_tokens": 6,
                                           "temperature": 0})
    assert comp["object"] == "text_completion" and comp["usage"]["completion_tokens"] >= 1

    chat = _chat(worker, [{"role": "user", "content": "Say hi."}], max_tokens=6)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] >= 1

    body = {"model": name, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 6,
            "temperature": 0, "stream": True}
    req = urllib.request.Request(worker.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                events.append(json.loads(line[5:]))
    assert events and all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
