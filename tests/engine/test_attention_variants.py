"""`engine/eval/attention.py`: the four cache-aware attentions the device run times compute
the same attention, and leave the same cache behind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.eval.attention import FUNCTIONS, VARIANTS, attention_table, inputs


def reference(x: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention over each call's cache with its active slots' entries replaced by
    their fresh K/V, in float64; and the pools that replacement leaves."""
    k_pool, v_pool = x["k_pool"].double().clone(), x["v_pool"].double().clone()
    for g, (row, slots) in enumerate(zip(x["rows"], x["slots"], strict=True)):
        k_pool[row, slots], v_pool[row, slots] = x["k"][g].double(), x["v"][g].double()
    keys, values = k_pool[x["rows"]].transpose(1, 2), v_pool[x["rows"]].transpose(1, 2)
    return F.scaled_dot_product_attention(x["q"].double(), keys, values), k_pool, v_pool


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_the_cache_aware_attention(variant):
    x = inputs(heads=3, head_dim=8, slots=40, batch=3, active=7, device="cpu",
               dtype=torch.float32, seed=1)  # fmt: skip
    expected, k_pool, v_pool = reference(x)
    out = FUNCTIONS[variant](x)  # writes the fresh K/V into x's pools
    assert out.shape == (6, 3, 7, 8)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x["k_pool"].double(), k_pool)
    torch.testing.assert_close(x["v_pool"].double(), v_pool)


def test_active_slots_are_distinct_and_their_stale_entries_marked():
    x = inputs(heads=2, head_dim=4, slots=20, batch=2, active=5, device="cpu",
               dtype=torch.float32)  # fmt: skip
    for slots, stale in zip(x["slots"], x["stale"], strict=True):
        assert len(set(slots.tolist())) == 5
        assert stale.nonzero().flatten().tolist() == sorted(slots.tolist())


def test_the_attention_table_times_every_variant_against_concat():
    report = attention_table("digits", [1, 2], device="cpu", repeats=2)
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["errors"] == {} and set(row["us_per_call"]) == set(VARIANTS)
        assert row["vs_concat"]["concat"] == 1.0 and all(t > 0 for t in row["us_per_call"].values())
