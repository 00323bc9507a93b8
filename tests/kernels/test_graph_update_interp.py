"""msa_kernels.update_graph_decode_plan_from_slots: the one-launch Triton update (interpreted, in a child process)
and the torch path against a page table computed directly from the slot table. Plan buffers are poisoned first;
lengths of 1 token, exactly one block, one block + 1 token, and the plan's full width; requests on scattered rows."""

from __future__ import annotations

import pytest
import torch
from interpreter_child import interpreted_main, run_interpreted

WIDTH = 12


def _case():
    from msa_kernels import graph_decode_plan, update_graph_decode_plan_from_slots

    requests, pages_total, batch = 9, 200, 5
    slot_table = torch.full((requests, WIDTH * 128 + 7), -5, dtype=torch.int32)
    rows = torch.tensor([7, 2, 0, 5, 3])
    lengths = torch.tensor([1, 128, 129, WIDTH * 128, 700])
    want_pages = []
    for r, n in zip(rows.tolist(), lengths.tolist()):
        pages = torch.randperm(pages_total)[: -(-n // 128)]
        slots = (pages[:, None] * 128 + torch.arange(128)[None, :]).reshape(-1)[:n]
        slot_table[r, :n] = slots.to(torch.int32)
        want_pages.append(pages)
    plan = graph_decode_plan(batch, WIDTH, "cpu")
    plan.page_table.fill_(-77)
    plan.seq_lens.fill_(-77)
    plan.q_pos.fill_(-77)
    update_graph_decode_plan_from_slots(plan, slot_table, rows, lengths)
    assert plan.seq_lens.tolist() == lengths.tolist()
    assert plan.q_pos.tolist() == (lengths - 1).tolist()
    for b, pages in enumerate(want_pages):
        got = plan.page_table[b, : pages.numel()]
        assert torch.equal(got, pages.to(torch.int32)), (b, got.tolist(), pages.tolist())
    return {"ok": True}


def test_torch_path():
    assert _case()["ok"]


def test_triton_update_in_interpreter():
    assert run_interpreted(__file__, "update", timeout=300)["ok"]


def test_shapes_are_checked():
    from msa_kernels import MSAInputError, graph_decode_plan, update_graph_decode_plan_from_slots

    plan = graph_decode_plan(2, WIDTH, "cpu")
    with pytest.raises(MSAInputError, match="must be \\[2\\]"):
        update_graph_decode_plan_from_slots(plan, torch.zeros(4, 256, dtype=torch.int32), torch.zeros(3), torch.ones(2))


if __name__ == "__main__":
    interpreted_main({"update": _case})
