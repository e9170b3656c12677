"""Table tests of the pure schedule functions against the official loop's recorded values."""

from __future__ import annotations

import json

import pytest
import torch

from engine.decode.schedules import cfg_scale, mask_len, step_plan
from engine.model.diffusion import space_timesteps


def test_every_official_table_is_reproduced(ref):
    tables = json.loads((ref / "schedules.json").read_text())
    checked = 0
    for seq_key in ("seq_len_256", "seq_len_64"):
        seq_len = int(seq_key.rsplit("_", 1)[1])
        for iter_key, table in tables[seq_key].items():
            num_iter = int(iter_key.rsplit("_", 1)[1])
            plan = step_plan(num_iter, seq_len)
            assert [s.num_pred for s in plan] == table["tokens_predicted_per_step"], iter_key
            assert [s.mask_len for s in plan] == table["mask_len_per_step"], iter_key
            unknown_after = [s.unknown_before - s.num_pred for s in plan]
            assert unknown_after == table["unknown_after_step"], iter_key
            zero = [s.index for s in plan if s.num_pred == 0]
            assert zero == table["steps_with_zero_tokens"], iter_key
            checked += 1
    assert checked >= 10


def test_linear_cfg_matches_official_float32_values(ref):
    tables = json.loads((ref / "schedules.json").read_text())
    expected = tables["cfg_iter_linear_cfg3.0_seq_len_256_num_iter_64"]
    plan = step_plan(64, 256)
    assert [cfg_scale(3.0, "linear", s.mask_len, 256) for s in plan] == expected


def test_linear_cfg_matches_the_trace(load_golden):
    trace = load_golden("sample_trace_perturbed.safetensors")
    for s in step_plan(8, 64):
        assert cfg_scale(3.0, "linear", s.mask_len, 64) == trace[f"step{s.index}.cfg_iter"].item()
        assert s.mask_len == trace[f"step{s.index}.mask_len"].item()
        predicted = trace[f"step{s.index}.mask_to_pred"].sum(dim=1)
        assert torch.equal(predicted, torch.full((2,), s.num_pred))


@pytest.mark.parametrize(
    ("num_iter", "seq_len", "first", "last"),
    [
        (64, 256, 1, 6),  # slow start, bigger steps at the end
        (256, 256, 1, 1),  # one token per step, the README evaluation setting
        (1, 256, 256, 256),  # a single step predicts everything
        (8, 64, 2, 12),
    ],
)
def test_plan_edges(num_iter, seq_len, first, last):
    plan = step_plan(num_iter, seq_len)
    assert sum(s.num_pred for s in plan) == seq_len
    assert plan[0].num_pred == first and plan[-1].num_pred == last
    assert plan[-1].num_pred == plan[-1].unknown_before  # the last step predicts all remaining


def test_short_sequences_get_zero_token_steps_instead_of_crashing():
    plan = step_plan(256, 64)  # upstream raises IndexError here
    assert sum(s.num_pred for s in plan) == 64
    assert sum(s.num_pred == 0 for s in plan) == 192


def test_mask_len_clamp():
    assert mask_len(0, 64, 256, 256) == 255  # cos schedule, floor
    assert mask_len(63, 64, 256, 6) == 1  # never below one...
    assert mask_len(10, 16, 256, 3) == 2  # ...and at least one predicted


@pytest.mark.parametrize(
    ("cfg", "schedule", "mask_len_", "expected"),
    [
        (3.0, "constant", 200, 3.0),
        (3.0, "linear", 255, 1.0078125),
        (3.0, "linear", 1, 2.9921875),
        (1.0, "linear", 100, 1.0),
        (4.0, "linear", 128, 2.5),
    ],
)
def test_cfg_scale_table(cfg, schedule, mask_len_, expected):
    assert cfg_scale(cfg, schedule, mask_len_, 256) == expected


def test_unknown_cfg_schedule_is_rejected():
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scale(3.0, "cosine", 10, 256)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("ddim50", list(range(0, 1000, 20))), ("ddim100", list(range(0, 1000, 10)))],
)
def test_ddim_respacing_keeps_every_kth_step_from_zero(spec, expected):
    assert space_timesteps(1000, spec) == expected


def test_ddim_respacing_that_no_stride_gives_is_refused():
    with pytest.raises(ValueError, match="cannot keep exactly"):
        space_timesteps(1000, "ddim999")
