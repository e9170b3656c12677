"""On a CUDA device (skipped without one; `scripts/bench_gpu.py` runs them): every mode's
knobs off are exact in fp32, every mode runs under bf16 autocast, and a non-full step makes
no host sync (CUDA's sync debug mode turns any into an error)."""

from __future__ import annotations

import pytest
import torch

from engine.decode.policy import MODES, make_policy
from engine.decode.randomness import request_randomness
from engine.decode.sampler import sample_tokens
from engine.model.config import SamplingParams
from tests.engine.test_turbo import OFF

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PARAMS = SamplingParams(num_iter=8, cfg=3.0)


def run(model, policy, on_step=None, units=None):
    config = model.config
    rng = request_randomness((1, 2), config.seq_len, config.token_embed_dim, 100, "cuda")
    labels = torch.tensor((3, 5), device="cuda")
    return sample_tokens(model, labels, [PARAMS] * 2, rng, policy, on_step=on_step, units=units)


@pytest.fixture(scope="module")
def cuda_deep(deep):
    return deep.to("cuda")


@pytest.mark.parametrize("name", list(OFF))
def test_knobs_off_are_exact_on_cuda(cuda_deep, name):
    torch.backends.cuda.matmul.allow_tf32 = False
    baseline = run(cuda_deep, make_policy("mar"))
    out = run(cuda_deep, make_policy(OFF[name]))
    torch.testing.assert_close(out, baseline, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_under_bf16_on_cuda(cuda_deep, mode):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = run(cuda_deep, make_policy(mode))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("runner", ["eager", "units"])
@pytest.mark.parametrize("mode", ["marche", "turbo", "quality", "fast"])
def test_no_host_sync_in_a_non_full_step_on_cuda(cuda_deep, mode, runner):
    """Eager, and through the units (CUDA graphs of the head and the transformer's passes,
    their plans copied to the device asynchronously). One step engine serves both runs, as a
    server keeps it: the units bound to its pool are captured in the first run."""
    from engine.decode.step import StepEngine

    units = None
    if runner == "units":
        from engine.decode.units.build import transformer_units
        from engine.decode.units.head import HEAD_BUCKETS, HeadUnits

        units = transformer_units(cuda_deep, "cuda-graphs")
        units.head = HeadUnits(cuda_deep.diffloss, "cuda-graphs", (*HEAD_BUCKETS, 512))
    engine = StepEngine(cuda_deep, 2, "cuda", units)
    config = cuda_deep.config

    def generate(check: bool) -> None:
        rng = request_randomness((1, 2), config.seq_len, config.token_embed_dim, 100, "cuda")
        labels = torch.tensor((3, 5), device="cuda")
        rows = [engine.admit(labels[i], PARAMS, make_policy(mode).config, rng[i]) for i in (0, 1)]
        try:
            with torch.no_grad():
                while not rows[0].finished:
                    engine.step(rows)
                    full = all(r.active[-1] == 1.0 for r in rows)  # the next step may sync
                    if check:
                        torch.cuda.set_sync_debug_mode("default" if full else "error")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for row in rows:
            engine.release(row)

    generate(check=False)  # warm: coefficients on the device, units captured
    generate(check=True)


@pytest.mark.parametrize("mode", MODES)
def test_head_units_replay_what_eager_computes_on_cuda(cuda_deep, mode):
    """One CUDA graph per (plan, guided, token bucket), captured on first use and replayed:
    the captured kernels are eager's, so fp32 tokens agree to rounding, and bf16 runs."""
    from engine.decode.units.common import DecodeUnits
    from engine.decode.units.head import HEAD_BUCKETS, HeadUnits

    torch.backends.cuda.matmul.allow_tf32 = False
    eager = run(cuda_deep, make_policy(mode))
    head = HeadUnits(cuda_deep.diffloss, "cuda-graphs", (*HEAD_BUCKETS, 512))
    units = DecodeUnits(head=head)
    out = run(cuda_deep, make_policy(mode), units=units)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    assert head.stats.hits > 0 and head.stats.misses == 0 and head.stats.built > 0
    built = head.stats.built  # replays only: no capture on a second run
    out = run(cuda_deep, make_policy(mode), units=units)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    assert head.stats.built == built
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(run(cuda_deep, make_policy(mode), units=units)).all()


@pytest.mark.parametrize("mode", MODES)
def test_transformer_units_replay_what_eager_computes_on_cuda(cuda_deep, mode):
    """Full passes as CUDA graphs per (calls, known tokens), MARché's cache refills included
    (bound to the run's pool), and MARché's lazy passes (append encoder, cache-aware
    decoder, positions computed on the device): fp32 tokens agree with eager to rounding."""
    from engine.decode.units.build import transformer_units

    torch.backends.cuda.matmul.allow_tf32 = False
    eager = run(cuda_deep, make_policy(mode))
    units = transformer_units(cuda_deep, "cuda-graphs")
    out = run(cuda_deep, make_policy(mode), units=units)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    assert units.full.stats.hits > 0 and units.full.stats.misses == 0
    lazy = units.lazy.stats
    assert lazy.misses == 0 and (lazy.hits > 0) == (mode != "mar")


@pytest.mark.parametrize("mode", MODES)
def test_every_attention_runs_on_flash_or_memory_efficient_sdpa_on_cuda(cuda_deep, mode):
    """Under bf16, with SDPA held to its flash and memory-efficient backends (it raises where
    neither takes a call: a shape, a stride or a mask only the math backend serves), every
    mode runs eager and through the transformer's units."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from engine.decode.units.build import transformer_units

    fast = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(fast):
        eager = run(cuda_deep, make_policy(mode))
        units = transformer_units(cuda_deep, "cuda-graphs")
        out = run(cuda_deep, make_policy(mode), units=units)
    assert torch.isfinite(eager).all() and torch.isfinite(out).all()
    assert units.full.stats.misses == 0 and units.lazy.stats.misses == 0
