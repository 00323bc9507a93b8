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
from .transfer import to_device


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
    # Page ids are proved to lie in a pool of this many pages (plan(num_pages=...)); None: not checked here.
    pages_checked_for: int | None = None
    # The caller vouches for the page table (plan(check_pages=False)): nothing reads it back to the host.
    pages_trusted: bool = False

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

    @property
    def qo_indptr_list(self) -> list[int]:
        """qo_indptr on the host (from q_lens_list: reading the device tensor would sync the stream)."""
        ptr = [0]
        for n in self.q_lens_list:
            ptr.append(ptr[-1] + n)
        return ptr

    def token_ranges(self) -> list[tuple[int, int]]:
        """[lo, hi) of each request's queries in the token axis."""
        ptr = self.qo_indptr_list
        return [(ptr[b], ptr[b + 1]) for b in range(self.batch_size)]

    def pages_need_check(self, num_pages: int) -> bool:
        """Whether a kernel reading this plan's pages in a pool of `num_pages` must check them itself."""
        return not self.pages_trusted and (self.pages_checked_for is None or self.pages_checked_for > num_pages)


def _host_ints(values: torch.Tensor | list[int], name: str) -> list[int]:
    """A length list on the host; a device tensor is read back (a stream sync: pass lists where speed matters)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise MSAInputError(f"{name} must be one length per request, got shape {tuple(values.shape)}")
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]


def plan(
    page_table: torch.Tensor,
    seq_lens: torch.Tensor | list[int],
    q_lens: torch.Tensor | list[int] | None = None,
    *,
    num_pages: int | None = None,
    topk: int = TOPK_BLOCKS,
    check_pages: bool = True,
) -> MSAPlan:
    """Build the plan of one forward batch. `q_lens` defaults to 1 per request (decode).

    `num_pages`, when given, checks that every page id the batch touches exists in the pool. That reads the
    page table back to the host (a stream sync on a GPU); `check_pages=False` skips it for callers whose
    page tables come from their own allocator (the SGLang plugin), and then nothing in building or running
    the plan syncs when the lengths are host lists or CPU tensors.
    """
    device = page_table.device
    seq_list = _host_ints(seq_lens, "seq_lens")
    q_list = [1] * len(seq_list) if q_lens is None else _host_ints(q_lens, "q_lens")
    if len(q_list) != len(seq_list):
        raise MSAInputError(f"q_lens ({len(q_list)} requests) and seq_lens ({len(seq_list)}) must match")
    if any(s < 0 for s in seq_list):
        raise MSAInputError(f"seq_lens must be >= 0, got {seq_list}")
    for b, (s, n) in enumerate(zip(seq_list, q_list)):
        if n < 0 or n > s:
            raise MSAInputError(f"request {b}: {n} new tokens cannot exceed its sequence of {s} tokens")
    check_page_table(page_table, seq_list, num_pages if num_pages is not None else 1 << 62, check_pages)
    seq = torch.tensor(seq_list, dtype=torch.int32)
    ql = torch.tensor(q_list, dtype=torch.int32)
    indptr = torch.zeros(len(q_list) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(ql, 0)
    pos = [torch.arange(s - n, s, dtype=torch.int32) for s, n in zip(seq_list, q_list)]
    req = [torch.full((n,), b, dtype=torch.int32) for b, n in enumerate(q_list)]
    return MSAPlan(
        page_table=page_table.to(torch.int32),
        seq_lens=to_device(seq, device),
        q_lens=to_device(ql, device),
        qo_indptr=to_device(indptr, device),
        q_pos=to_device(torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int32), device),
        q_req=to_device(torch.cat(req) if req else torch.zeros(0, dtype=torch.int32), device),
        seq_lens_list=seq_list,
        q_lens_list=q_list,
        topk=topk,
        pages_checked_for=num_pages if check_pages and num_pages is not None else None,
        pages_trusted=not check_pages,
    )
