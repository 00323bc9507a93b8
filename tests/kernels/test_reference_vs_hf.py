"""The MSA reference is M3's attention: proven against transformers' MiniMax-M3 implementation.

1. Selection: our index scoring + block top-k against transformers' indexer, on random small configs.
2. The whole model: our reference swapped in for transformers' sparse attention inside a tiny M3 (random
   sizes and weights each run), logits compared at lengths below and well above 2,048 tokens, where
   selection drops blocks. Both run in float64 so that rounding cannot flip near-tied blocks (transformers'
   eager softmax still runs in float32, which bounds the agreement near 1e-7 relative): a semantic
   difference (a wrong block, a missing causal mask) moves logits by orders of magnitude more.
"""

from __future__ import annotations

import random

import pytest
import torch

from m3serve.hf_compat import load_text_model
from m3serve.tiny_model import write_tiny_model
from msa_kernels.reference import index_block_scores, select_blocks, sparse_attention
from msa_kernels.testing import selection_disagreements

hf = pytest.importorskip("transformers.models.minimax_m3_vl.modeling_minimax_m3_vl")


def _random_sizes(rng: random.Random) -> dict:
    kv = rng.choice([1, 2, 4])
    return {
        "layers": rng.choice([2, 3]),
        "dense_layers": 1,
        "hidden": rng.choice([64, 96, 128]),
        "heads": kv * rng.choice([1, 2, 4]),
        "kv_heads": kv,
        "head_dim": rng.choice([16, 32]),
        "index_dim": rng.choice([16, 32]),
        "experts": 4,
        "experts_per_tok": 2,
        "expert_width": 32,
        "dense_width": 64,
        "vision_layers": 1,
    }


def _index_qk(indexer, hidden, cos, sin):
    """The index branch's projections, norms and RoPE, through transformers' own modules."""
    b, s, _ = hidden.shape
    iq = indexer.q_norm(indexer.q_proj(hidden).view(b, s, -1, indexer.head_dim)).transpose(1, 2)
    ik = indexer.k_norm(indexer.k_proj(hidden).view(b, s, 1, indexer.head_dim)).transpose(1, 2)
    return hf.apply_rotary_pos_emb(iq, ik, cos[..., : indexer.head_dim], sin[..., : indexer.head_dim])


def _reference_sparse_forward(self, hidden_states, position_embeddings, attention_mask=None,
                              past_key_values=None, **kwargs):
    """MiniMaxM3VLAttention.forward with the MSA math (scoring, selection, attention) from our reference."""
    b, s, _ = hidden_states.shape
    hd = self.head_dim
    q = self.q_norm(self.q_proj(hidden_states).view(b, s, -1, hd)).transpose(1, 2)
    k = self.k_norm(self.k_proj(hidden_states).view(b, s, -1, hd)).transpose(1, 2)
    v = self.v_proj(hidden_states).view(b, s, -1, hd).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = hf.apply_rotary_pos_emb(q, k, cos, sin)
    iq, ik = _index_qk(self.indexer, hidden_states, cos, sin)
    pos = torch.arange(s)
    outs = []
    for i in range(b):
        scores = index_block_scores(iq[i].transpose(0, 1), ik[i, 0], pos)
        sel = select_blocks(scores, pos, self.indexer.topk_blocks)
        o = sparse_attention(q[i].transpose(0, 1), k[i].transpose(0, 1), v[i].transpose(0, 1), sel, pos,
                             self.scaling)
        outs.append(o.reshape(s, -1))
    self._m3serve_reference_calls = getattr(self, "_m3serve_reference_calls", 0) + 1
    return self.o_proj(torch.stack(outs)), None


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    sizes = _random_sizes(rng)
    path = write_tiny_model(tmp_path_factory.mktemp("hf-parity") / "ckpt", seed=seed, **sizes)
    model = load_text_model(path, dtype=torch.float64)
    print(f"\nrandom tiny M3: seed={seed} sizes={sizes}")
    return model


@pytest.mark.parametrize("seq_len", [700, 2048, 3000])
def test_selection_matches_transformers_indexer(random_model, seq_len):
    layer = next(layer for layer in random_model.model.layers if layer.self_attn.indexer is not None)
    indexer = layer.self_attn.indexer
    hidden = torch.randn(1, seq_len, random_model.config.hidden_size, dtype=torch.float64)
    pos = torch.arange(seq_len)[None]
    cos, sin = random_model.model.rotary_emb(hidden, pos)
    hf_sel = indexer(hidden, (cos, sin), None, pos)[0]  # [H, S, topk], score order, -1 padded
    iq, ik = _index_qk(indexer, hidden, cos, sin)
    scores = index_block_scores(iq[0].transpose(0, 1), ik[0, 0], pos[0])
    ours = select_blocks(scores, pos[0], indexer.topk_blocks)
    hf_sorted = torch.where(hf_sel < 0, 1 << 20, hf_sel).sort(-1).values
    hf_sorted = torch.where(hf_sorted == 1 << 20, -1, hf_sorted).transpose(0, 1).to(torch.int32)
    hf_sorted = torch.nn.functional.pad(hf_sorted, (0, ours.shape[-1] - hf_sorted.shape[-1]), value=-1)
    differ, not_ties = selection_disagreements(ours, hf_sorted, scores, atol=1e-9, rtol=1e-9)
    print(f"seq_len={seq_len}: {differ} rows differ from transformers, {not_ties} not near-ties")
    assert not_ties == 0
    assert differ <= 1
    if seq_len > 2048:
        kept = (ours[-1] >= 0).sum(-1)
        assert (kept == 16).all(), "beyond 2,048 tokens selection keeps exactly 16 blocks"


@pytest.mark.parametrize("seq_len", [1000, 2700])
def test_model_logits_match_with_reference_swapped_in(random_model, seq_len, monkeypatch):
    vocab = random_model.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq_len))
    with torch.no_grad():
        want = random_model(ids, use_cache=False).logits
    original = hf.MiniMaxM3VLAttention.forward

    def patched(self, *args, **kwargs):
        if self.indexer is None:
            return original(self, *args, **kwargs)
        return _reference_sparse_forward(self, *args, **kwargs)

    monkeypatch.setattr(hf.MiniMaxM3VLAttention, "forward", patched)
    with torch.no_grad():
        got = random_model(ids, use_cache=False).logits
    calls = sum(getattr(layer.self_attn, "_m3serve_reference_calls", 0) for layer in random_model.model.layers)
    assert calls >= 1, "the reference really ran"
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"seq_len={seq_len}: max |logit difference| = {diff:.3e} (logits up to {scale:.2f})")
    assert diff < 2e-5 * max(scale, 1.0)
    # Sanity: the comparison can fail. Dense attention (no selection) differs beyond 2,048 tokens.
    if seq_len > 2048:
        monkeypatch.setattr(hf.MiniMaxM3VLAttention, "forward", original)
        for layer in random_model.model.layers:
            if layer.self_attn.indexer is not None:
                monkeypatch.setattr(layer.self_attn.indexer, "topk_blocks", 10_000)
        with torch.no_grad():
            dense = random_model(ids, use_cache=False).logits
        dense_diff = (dense - want).abs().max().item()
        print(f"seq_len={seq_len}: dense attention instead differs by {dense_diff:.3e}")
        assert dense_diff > max(100 * diff, 1e-3)
