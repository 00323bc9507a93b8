"""The cache layout every MSA op shares, and the checks that keep bad inputs out.

SGLang's MiniMax sparse KV pool stores tokens in *slots*: K and V as [slots, kv_heads, head_dim],
index-K as [slots, 1, index_dim]. With page size 128 (= one MSA block) page `p` holds slots
[p*128, (p+1)*128), so a request's page table [max_pages] of page ids maps position `t` to slot
`page_table[t // 128] * 128 + t % 128`. Blocks are anchored at absolute position 0, which is why the
page size must equal the MSA block size.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 128  # tokens per MSA block == tokens per KV page
TOPK_BLOCKS = 16  # selected blocks per (query token, index head), the local block included


class MSAInputError(ValueError):
    """Raised when an MSA op gets inputs it cannot serve; the message names the argument and the problem."""


def num_blocks(length: int) -> int:
    """Blocks (pages) needed to hold `length` tokens."""
    return -(-int(length) // BLOCK_SIZE)


def check_cache(name: str, cache: torch.Tensor, heads: int | None = None, dim: int | None = None) -> None:
    """A slot-major cache: [slots, heads, dim] with slots a whole number of pages."""
    if cache.dim() != 3:
        raise MSAInputError(f"{name} must be [slots, heads, dim], got shape {tuple(cache.shape)}")
    if cache.shape[0] % BLOCK_SIZE:
        raise MSAInputError(
            f"{name} has {cache.shape[0]} slots, not a multiple of the page size {BLOCK_SIZE}"
        )
    if heads is not None and cache.shape[1] != heads:
        raise MSAInputError(f"{name} has {cache.shape[1]} heads, expected {heads}")
    if dim is not None and cache.shape[2] != dim:
        raise MSAInputError(f"{name} has head dim {cache.shape[2]}, expected {dim}")


def check_page_table(page_table: torch.Tensor, lens: list[int], num_pages: int, check_pages: bool = True) -> None:
    """Every request's pages must exist in the pool and cover its whole sequence of `lens[b]` (>= 0) tokens.
    The page ids themselves are read back to the host (a stream sync on a GPU) only with `check_pages`."""
    if page_table.dim() != 2:
        raise MSAInputError(f"page_table must be [batch, max_pages], got shape {tuple(page_table.shape)}")
    if len(lens) != page_table.shape[0]:
        raise MSAInputError(f"seq_lens must be [batch={page_table.shape[0]}], got {len(lens)} lengths")
    for b, length in enumerate(lens):
        need = num_blocks(length)
        if need > page_table.shape[1]:
            raise MSAInputError(
                f"page table of request {b} has {page_table.shape[1]} pages but its sequence of "
                f"{length} tokens needs {need}"
            )
    if not check_pages:
        return
    pt = page_table.cpu()
    for b, length in enumerate(lens):
        used = pt[b, :num_blocks(length)].long()  # int64: an int32 compare with a huge num_pages would wrap
        bad = (used < 0) | (used >= num_pages)
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            raise MSAInputError(
                f"page table of request {b} does not cover its sequence: entry {j} is {int(used[j])}, "
                f"outside the pool's {num_pages} pages"
            )


def slots_for_positions(page_row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Slot ids of absolute `positions` of one request whose page table row is `page_row`."""
    positions = positions.long()
    return page_row.long()[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The references accumulate in float32 at least, and in float64 when given float64 (exact parity tests)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
