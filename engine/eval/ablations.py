"""Quality ablations on the shipped digits model: every decoding knob alone, and the presets.

One process, one set of seeds: exact MAR first (its images are kept as the PSNR reference),
then each variant. Every row is the `engine.eval.quality` report of that decoding config plus
the mean per-image PSNR against MAR on the same seeds. Two sets:

* `marche`: MARché with its defaults and the paper's ablations (Tables 2-3, our data);
* `turbo`: each acceleration knob alone (condition cache, head step schedules, head cache) and
  the presets `marche` and `turbo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace

from torch import Tensor

from engine.decode.head import HeadConfig
from engine.decode.marche import MarcheConfig
from engine.decode.policy import PRESETS, DecodeConfig, make_policy
from engine.eval.quality import evaluate, psnr
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline

ABLATION_SETS = ("marche", "turbo")


def ablations(base: MarcheConfig | None = None) -> dict[str, DecodeConfig]:
    """MARché `base` (the paper's defaults if None) and one change of it per ablation."""
    base = base or MarcheConfig()

    def with_marche(config: MarcheConfig) -> DecodeConfig:
        return DecodeConfig(marche=config)

    return {
        "MARché (defaults)" if base == MarcheConfig() else "MARché": with_marche(base),
        "no caching tokens": with_marche(replace(base, caching_tokens=False)),
        "random refresh": with_marche(replace(base, refresh="random")),
        "low-attention refresh": with_marche(replace(base, refresh="low_attention")),
        "encoder full recompute": with_marche(replace(base, encoder="full")),
    }


def turbo_ablations() -> dict[str, DecodeConfig]:
    """Each turbo knob alone on exact MAR, then the presets (turbo's own knobs as shipped)."""
    turbo = PRESETS["turbo"]
    head = turbo.head
    return {
        "condition cache alone": DecodeConfig(cond_cache=turbo.cond_cache),
        "head steps linear alone": DecodeConfig(head=replace(head, cache_period=0)),
        "head steps cosine alone": DecodeConfig(
            head=replace(head, schedule="cosine", cache_period=0)
        ),
        "head cache alone": DecodeConfig(head=HeadConfig(cache_period=head.cache_period)),
        "marche (preset)": PRESETS["marche"],
        "turbo (preset)": turbo,
    }


def variant_set(name: str, base: MarcheConfig | None = None) -> dict[str, DecodeConfig]:
    if name == "marche":
        return ablations(base)
    if name == "turbo":
        return turbo_ablations()
    raise ValueError(f"unknown ablation set {name!r}; choose one of {ABLATION_SETS}")


ABLATIONS = ablations()


def run_ablations(
    pipe: Pipeline,
    params: SamplingParams,
    num: int = 200,
    seed: int = 0,
    batch_size: int = 50,
    variants: dict[str, DecodeConfig] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict]:
    """Rows [MAR, *variants]: name, knobs, the quality report, psnr_vs_mar_db (None for MAR)."""
    variants = ablations() if variants is None else variants
    reference: dict[int, Tensor] = {}  # first seed of a batch -> MAR images of that batch

    def baseline(labels: Tensor, seeds: list[int]) -> Tensor:
        images = pipe.generate(labels.tolist(), seeds, params=params, policy=make_policy("mar"))
        reference[seeds[0]] = images
        return images

    def report(name: str, generate) -> dict:
        def step(done: int, total: int) -> None:
            if progress is not None:
                progress(name, done, total)

        result = evaluate(generate, num=num, seed=seed, batch_size=batch_size, progress=step)
        return {"name": name, **result.to_dict()}

    rows = [{**report("MAR (exact)", baseline), "decoding": None, "psnr_vs_mar_db": None}]
    for name, config in variants.items():
        psnrs: list[float] = []
        row = report(name, _versus_mar(pipe, params, config, reference, psnrs))
        rows.append({**row, "decoding": asdict(config), "psnr_vs_mar_db": sum(psnrs) / len(psnrs)})
    return rows


def _versus_mar(
    pipe: Pipeline,
    params: SamplingParams,
    config: DecodeConfig,
    reference: dict[int, Tensor],
    psnrs: list[float],
) -> Callable[[Tensor, list[int]], Tensor]:
    """A generate function for `config` that appends per-image PSNR vs MAR."""

    def generate(labels: Tensor, seeds: list[int]) -> Tensor:
        images = pipe.generate(labels.tolist(), seeds, params=params, policy=make_policy(config))
        psnrs.extend(psnr(images, reference[seeds[0]]).tolist())
        return images

    return generate
