"""The plan: everything about a forward batch that every sparse layer shares (FlashInfer-style plan/run).

A batch holds B requests; request b has `seq_lens[b]` tokens in the cache after this step, of which the
last `q_lens[b]` are new (its queries); the earlier `seq_lens[b] - q_lens[b]` are its cached prefix.
New tokens are laid out request after request (as SGLang lays out an extend or decode batch).
The plan is built once per batch; kernels may attach their own precomputed work lists to `extras`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .layout import TOPK_BLOCKS, MSAInputError, check_page_table


@dataclass
class MSAPlan:
    page_table: torch.Tensor  # int32 [B, max_pages] page ids
    seq_lens: torch.Tensor  # int32 [B] tokens in cache after this step
    q_lens: torch.Tensor  # int32 [B] new tokens (queries) per request
    qo_indptr: torch.Tensor  # int32 [B+1] offsets of each request's queries in the token axis
    q_pos: torch.Tensor  # int32 [T] absolute position of each query token
    q_req: torch.Tensor  # int32 [T] request of each query token
    seq_lens_list: list[int]
    q_lens_list: list[int]
    topk: int = TOPK_BLOCKS
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.q_lens_list))

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens_list)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_list, default=0)

    def token_ranges(self) -> list[tuple[int, int]]:
        """[lo, hi) of each request's queries in the token axis."""
        ptr = self.qo_indptr.tolist()
        return [(ptr[b], ptr[b + 1]) for b in range(self.batch_size)]


def plan(
    page_table: torch.Tensor,
    seq_lens: torch.Tensor | list[int],
    q_lens: torch.Tensor | list[int] | None = None,
    *,
    num_pages: int | None = None,
    topk: int = TOPK_BLOCKS,
) -> MSAPlan:
    """Build the plan of one forward batch. `q_lens` defaults to 1 per request (decode).

    `num_pages`, when given, checks that every page id the batch touches exists in the pool.
    """
    device = page_table.device
    seq = torch.as_tensor(seq_lens, dtype=torch.int32, device=device)
    ql = torch.ones_like(seq) if q_lens is None else torch.as_tensor(q_lens, dtype=torch.int32, device=device)
    if ql.shape != seq.shape:
        raise MSAInputError(f"q_lens {tuple(ql.shape)} and seq_lens {tuple(seq.shape)} must match")
    seq_list, q_list = seq.tolist(), ql.tolist()
    for b, (s, n) in enumerate(zip(seq_list, q_list)):
        if n < 0 or n > s:
            raise MSAInputError(f"request {b}: {n} new tokens cannot exceed its sequence of {s} tokens")
    check_page_table(page_table, seq, num_pages if num_pages is not None else 1 << 62)
    indptr = torch.zeros(len(q_list) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(q_list, dtype=torch.int32), 0)
    pos = [torch.arange(s - n, s, dtype=torch.int32) for s, n in zip(seq_list, q_list)]
    req = [torch.full((n,), b, dtype=torch.int32) for b, n in enumerate(q_list)]
    return MSAPlan(
        page_table=page_table.to(torch.int32),
        seq_lens=seq,
        q_lens=ql,
        qo_indptr=indptr.to(device),
        q_pos=(torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int32)).to(device),
        q_req=(torch.cat(req) if req else torch.zeros(0, dtype=torch.int32)).to(device),
        seq_lens_list=seq_list,
        q_lens_list=q_list,
        topk=topk,
    )
