"""The decoding knobs (turbo's condition cache, head step schedule and head cache; GtR's
two-stage order and FTS) and the presets: each knob off is exact MAR, each on is a real
approximation, every mode is batch-independent, survives row retirement, runs under bf16
autocast, and makes no host sync on a non-full step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.decode.cond_cache import CondCacheConfig
from engine.decode.gtr import FtsConfig, GtrConfig
from engine.decode.head import HeadConfig, clipped_schedule, whole_mlp_steps
from engine.decode.marche import MarcheConfig
from engine.decode.policy import MODES, PRESETS, DecodeConfig, make_policy
from engine.decode.randomness import request_randomness
from engine.decode.step import StepEngine
from engine.model.config import SamplingParams
from tests.engine.conftest import run

GUIDED = SamplingParams(num_iter=8, cfg=3.0)
PLAIN = SamplingParams(num_iter=8, cfg=1.0)
EVERY_TOKEN = MarcheConfig(budget=16 + 256, refresh_period=1)
TURBO = PRESETS["turbo"]
TWO_STAGE = GtrConfig(structure_share=0.5, reconstruction_steps=2)

OFF = {  # each knob at its "off" setting, alone and composed
    "head constant": DecodeConfig(head=HeadConfig(schedule="constant")),
    "head upper = native": DecodeConfig(head=HeadConfig(upper=50)),
    "head cache period 1": DecodeConfig(head=HeadConfig(cache_period=1)),
    "cond cache period 1": DecodeConfig(cond_cache=CondCacheConfig(refresh_period=1)),
    "all off + every token": DecodeConfig(
        marche=EVERY_TOKEN,
        cond_cache=CondCacheConfig(refresh_period=1),
        head=HeadConfig(cache_period=1),
    ),
    "fts moves no steps": DecodeConfig(fts=FtsConfig(share=0.5, high=1.0, low=1.0)),
}
ON = {
    "cond cache": DecodeConfig(cond_cache=TURBO.cond_cache),
    "head linear": DecodeConfig(head=dataclasses.replace(TURBO.head, cache_period=0)),
    "head cosine": DecodeConfig(head=HeadConfig(schedule="cosine", upper=50, lower=5)),
    "head cache": DecodeConfig(head=HeadConfig(cache_period=3)),
    "turbo": TURBO,
    "gtr": DecodeConfig(gtr=TWO_STAGE),
    "fts": DecodeConfig(fts=FtsConfig()),
    "gtr + fts": DecodeConfig(gtr=TWO_STAGE, fts=FtsConfig()),
    "quality": PRESETS["quality"],
    "fast": PRESETS["fast"],
}


@pytest.mark.parametrize("params", [GUIDED, PLAIN], ids=["cfg3", "cfg1"])
@pytest.mark.parametrize("name", list(OFF))
def test_every_knob_off_is_exact_mar(deep, name, params):
    baseline = run(deep, make_policy("mar"), params)
    out = run(deep, make_policy(OFF[name]), params)
    torch.testing.assert_close(out, baseline, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(ON))
def test_every_knob_on_approximates(deep, name):
    baseline = run(deep, make_policy("mar"), GUIDED)
    out = run(deep, make_policy(ON[name]), GUIDED)
    assert out.shape == baseline.shape and torch.isfinite(out).all()
    assert (out.abs().sum(-1) > 0).all()  # every token generated
    assert (out - baseline).abs().max() > 1e-4  # the knob really changes the computation


def test_condition_cache_without_guidance_is_a_pass_through(deep):
    baseline = run(deep, make_policy("marche"), PLAIN)
    config = DecodeConfig(marche=MarcheConfig(), cond_cache=CondCacheConfig())
    policy = make_policy(config)
    torch.testing.assert_close(run(deep, policy, PLAIN), baseline, atol=0, rtol=0)
    assert policy.lazy_steps == 0


def test_condition_cache_runs_the_conditional_half_between_full_steps(deep):
    policy = make_policy(DecodeConfig(cond_cache=CondCacheConfig(refresh_period=3)))
    run(deep, policy, GUIDED)
    assert policy.lazy_steps == 8 - 3  # full at steps 0, 3, 6


@pytest.mark.parametrize(
    "schedule, first, last, middle", [("linear", 50, 5, 27), ("cosine", 50, 5, 27)]
)
def test_head_step_schedules_anneal_from_upper_to_lower(schedule, first, last, middle):
    config = HeadConfig(schedule=schedule, upper=50, lower=5)
    counts = [config.num_steps(s, 65, 50) for s in range(65)]
    assert counts[0] == first and counts[-1] == last and counts[32] == middle
    assert counts == sorted(counts, reverse=True)
    assert HeadConfig().num_steps(10, 64, 100) == 100  # constant: the model's own
    assert HeadConfig(schedule="linear", upper=200, lower=5).num_steps(0, 64, 100) == 100


def test_linear_schedule_is_disas_rule():
    config = HeadConfig(schedule="linear", upper=50, lower=5)
    for step in range(64):
        assert config.num_steps(step, 64, 100) == 5 + int((63 - step) / 63 * 45)


@pytest.mark.parametrize("steps", [5, 13, 50])
def test_clipped_respacing_spans_zero_to_clip(steps):
    schedule = clipped_schedule(steps, 950)
    assert schedule.num_timesteps == steps
    assert schedule.timestep_map[0] == 0 and schedule.timestep_map[-1] == 950


def test_head_cache_whole_mlp_steps_include_the_noisy_end_and_the_period():
    full = whole_mlp_steps(50, 3, 0.1)
    assert {49, 48, 47, 46, 45} <= full  # the noisiest 10% always
    assert all(i in full for i in range(49, -1, -3))  # every 3rd call from the first
    assert len(full) < 50
    assert whole_mlp_steps(50, 1, 0.0) == frozenset(range(50))


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        HeadConfig(schedule="exponential")
    with pytest.raises(ValueError, match="lower"):
        HeadConfig(upper=3, lower=5)
    with pytest.raises(ValueError):
        CondCacheConfig(refresh_period=0)
    assert set(MODES) == {"mar", "marche", "turbo", "quality", "fast"}


@pytest.mark.parametrize("mode", MODES)
def test_an_image_does_not_depend_on_its_batch_mates(deep, mode):
    alone = run(deep, make_policy(mode), GUIDED, classes=(5,), seeds=(2,))
    mates = [SamplingParams(8, cfg=1.5, cfg_schedule="constant"), GUIDED, PLAIN]
    batch = run(deep, make_policy(mode), mates, classes=(1, 5, 9), seeds=(7, 2, 3))
    # GEMMs of another batch shape round differently in the last bits (seen: 1.4e-5 after 8
    # steps of a random model); a batch-dependent computation would differ by O(1)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("params", [GUIDED, PLAIN], ids=["cfg3", "cfg1"])
def test_retiring_a_row_mid_run_leaves_its_batch_mates_unchanged(deep, mode, params):
    classes, seeds = (3, 5, 7), (1, 2, 3)
    full = run(deep, make_policy(mode), params, classes, seeds)

    def on_step(info):
        return [True, False, True] if info.step == 1 else None

    out = run(deep, make_policy(mode), params, classes, seeds, on_step=on_step)
    torch.testing.assert_close(out, full[[0, 2]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_under_bf16_autocast(deep, mode):
    """The CUDA path's dtype handling, as far as a CPU shows it: bf16 caches, fp32 head."""
    fp32 = run(deep, make_policy(mode), GUIDED)
    policy = make_policy(mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(deep, policy, GUIDED)
        again = run(deep, make_policy(mode), GUIDED)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, again, atol=0, rtol=0)  # deterministic
    assert (out - fp32).abs().mean() < 0.25 * fp32.abs().mean()  # bf16 rounding, not garbage

    engine = StepEngine(deep, capacity=2)  # the same run, to look into the cache pool
    randomness = request_randomness(
        (1, 2), deep.config.seq_len, deep.config.token_embed_dim, 100, "cpu"
    )
    rows = [
        engine.admit(c, GUIDED, PRESETS[mode], r) for c, r in zip((3, 5), randomness, strict=True)
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        while not rows[0].finished:
            engine.step(rows)
    torch.testing.assert_close(engine.tokens(rows), out, atol=0, rtol=0)
    buffers = engine.pool.buffers
    assert all(b.dtype == torch.bfloat16 for n, b in buffers.items() if n.endswith((".k", ".v")))
    assert any(n.endswith(".k") for n in buffers) == (mode != "mar")
    if "diff" in buffers:  # the residual stream (and so the diff) stays fp32
        assert buffers["diff"].dtype == torch.float32 and torch.isfinite(buffers["diff"]).all()


SYNC_OPS = {"_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal", "lift_fresh"}


class SyncRecorder(TorchDispatchMode):
    """Records ops that read device values back to the host (or copy host data in)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.seen: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in SYNC_OPS:
            self.seen.append((self.step, name))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["marche", "turbo"])
def test_no_host_sync_in_a_non_full_step(deep, mode):
    policy = make_policy(mode)
    recorder = SyncRecorder()

    def on_step(info):
        recorder.step = info.step + 1

    with recorder:
        run(deep, policy, GUIDED, on_step=on_step)
    non_full = {s for s, fraction in enumerate(policy.stats) if fraction < 1.0}
    assert non_full, "the run must have non-full steps to check"
    assert [(s, op) for s, op in recorder.seen if s in non_full] == []
