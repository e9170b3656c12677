"""Decoding policies: which accelerations a request's images are decoded with.

A `DecodeConfig` holds every knob, each exact when off; the engine (`step.py`) reads it per
image and never branches on a mode name. The named presets are the modes a request may ask
for:

* `mar`: exact MAR (full transformer, the model's own head): the oracle every mode is tested
  against;
* `marche`: MARché's cache-aware decoder (arXiv 2506.12035), head untouched;
* `turbo`: MARché + the CFG condition cache + DiSA's head-step annealing + LazyMAR's head cache
  (the combination measured best on FLOPs at bounded quality: docs/ENGINE.md, "Turbo");
* `quality` and `fast`: GtR's two-stage order (arXiv 2510.17171) on top of turbo, chosen by
  measurement on 1,000 digits over two seed sets (docs/ENGINE.md, "GtR").

`make_policy` wraps a config with what a run through it records (active-token fractions,
condition-cache skips).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.decode.cond_cache import CondCacheConfig
from engine.decode.gtr import FtsConfig, GtrConfig, two_stage_plan
from engine.decode.head import HeadConfig
from engine.decode.marche import MarcheConfig
from engine.decode.schedules import Step, step_plan


@dataclass(frozen=True)
class DecodeConfig:
    """Every decoding knob. `DecodeConfig()` is exact MAR; each field off is exact."""

    marche: MarcheConfig | None = None  # None: the transformer recomputes every step
    cond_cache: CondCacheConfig | None = None  # None: both CFG halves every step
    head: HeadConfig = field(default_factory=HeadConfig)
    gtr: GtrConfig | None = None  # None: MAR's one-stage random order over num_iter steps
    fts: FtsConfig | None = None  # None: every token of a step gets the head's steps

    def step_plan(self, num_iter: int, seq_len: int) -> list[Step]:
        """Every step of a `num_iter` run: MAR's one-stage schedule, or GtR's two stages."""
        if self.gtr is None:
            return step_plan(num_iter, seq_len)
        return two_stage_plan(num_iter, seq_len, self.gtr)

    def num_steps(self, num_iter: int) -> int:
        """AR steps a run of `num_iter` takes under this config (GtR: S + K)."""
        if self.gtr is None:
            return num_iter
        return self.gtr.structure_steps(num_iter) + self.gtr.reconstruction_steps


_MARCHE = MarcheConfig()
_TURBO = DecodeConfig(
    marche=_MARCHE,
    cond_cache=CondCacheConfig(refresh_period=9),  # LazyMAR's K; rarer than MARché's R 3
    head=HeadConfig(schedule="linear", upper=50, lower=10, cache_period=3),  # DiSA: 50 -> 5
)
PRESETS: dict[str, DecodeConfig] = {
    "mar": DecodeConfig(),
    "marche": DecodeConfig(marche=_MARCHE),
    "turbo": _TURBO,
    # GtR on turbo, chosen on 1,000 digits over two seed sets (docs/ENGINE.md, "GtR"):
    # quality the most FLOPs saved within +3% Fréchet and no drift the two-sample test can
    # measure; fast the most within 1 point and +10%
    "quality": replace(
        _TURBO, gtr=GtrConfig(structure_share=0.5, reconstruction_steps=16), fts=FtsConfig()
    ),
    "fast": replace(_TURBO, gtr=GtrConfig(structure_share=0.5, reconstruction_steps=8)),
}
MODES = tuple(PRESETS)


def preset(mode: str, marche: MarcheConfig | None = None) -> DecodeConfig:
    """The DecodeConfig of a mode; `marche` replaces its MARché knobs (if it uses MARché)."""
    if mode not in PRESETS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    config = PRESETS[mode]
    if marche is not None and config.marche is not None:
        config = replace(config, marche=marche)
    return config


class DecodePolicy:
    """A DecodeConfig for one run, and what the run recorded."""

    def __init__(self, config: DecodeConfig, name: str = "") -> None:
        self.config, self.name = config, name
        self.stats: list[float] = []  # mean active-token fraction of each step (1.0: full)
        self.lazy_steps = 0  # steps the condition cache ran the conditional half alone


def make_policy(mode: str | DecodeConfig, marche: MarcheConfig | None = None) -> DecodePolicy:
    """A fresh policy for one run: a mode name (with optional MARché knobs) or a DecodeConfig."""
    if isinstance(mode, str):
        return DecodePolicy(preset(mode, marche), mode)
    return DecodePolicy(mode, "custom")
