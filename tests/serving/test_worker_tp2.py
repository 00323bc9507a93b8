"""`m3serve worker --tp 2` on CPU (gloo): two ranks, each with half the heads, still match transformers."""

from __future__ import annotations

import pytest
import torch

PROMPT_LEN = 2300  # 18 blocks: selection drops blocks for the last ~250 queries and in decode


@pytest.fixture(scope="module")
def worker(tiny_checkpoint, tmp_path_factory, worker_factory):
    args = ["--tp", "2", "--dtype", "float32", "--max-total-tokens", "8192", "--skip-server-warmup",
            "--log-level", "warning"]
    with worker_factory(tiny_checkpoint, tmp_path_factory.mktemp("worker-tp2"), args) as w:
        yield w


def test_tp2_matches_transformers(worker, tiny_checkpoint):
    from m3serve.hf_compat import load_text_model

    ids = torch.randint(3, 259, (PROMPT_LEN,), generator=torch.Generator().manual_seed(11)).tolist()
    out = worker.generate(input_ids=ids, return_logprob=True, logprob_start_len=0,
                          sampling_params={"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True})
    full = ids + out["output_ids"]
    model = load_text_model(tiny_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    want = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    meta = out["meta_info"]
    got = torch.tensor([x[0] for x in meta["input_token_logprobs"][1:]] + [x[0] for x in meta["output_token_logprobs"]])
    diff = (got - want).abs().max().item()
    print(f"tp=2: max |logprob diff| {diff:.2e}")
    assert diff < 1e-3
    assert out["output_ids"] == logits[PROMPT_LEN - 1 : -1].argmax(-1).tolist()
