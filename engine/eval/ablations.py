"""MARché's quality ablations on the shipped digits model (the paper's Tables 2-3, our data).

One process, one set of seeds: exact MAR first (its images are kept as the PSNR reference),
then MARché with its defaults and each ablation. Every row is the `engine.eval.quality` report of
that policy plus the mean per-image PSNR against MAR on the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import Tensor

from engine.decode.marche import Marche, MarcheConfig
from engine.decode.policy import FullRecompute
from engine.eval.quality import evaluate, psnr
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline


def ablations(base: MarcheConfig | None = None) -> dict[str, MarcheConfig]:
    """`base` (the paper's defaults if None) and one change of it per ablation."""
    base = base or MarcheConfig()
    return {
        "MARché (defaults)" if base == MarcheConfig() else "MARché": base,
        "no caching tokens": replace(base, caching_tokens=False),
        "random refresh": replace(base, refresh="random"),
        "low-attention refresh": replace(base, refresh="low_attention"),
        "encoder full recompute": replace(base, encoder="full"),
    }


ABLATIONS = ablations()


def run_ablations(
    pipe: Pipeline,
    params: SamplingParams,
    num: int = 200,
    seed: int = 0,
    batch_size: int = 50,
    variants: dict[str, MarcheConfig] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict]:
    """Rows [MAR, *variants]: name, knobs, the quality report, psnr_vs_mar_db (None for MAR)."""
    variants = ablations() if variants is None else variants
    reference: dict[int, Tensor] = {}  # first seed of a batch -> MAR images of that batch

    def baseline(labels: Tensor, seeds: list[int]) -> Tensor:
        images = pipe.generate(labels.tolist(), seeds, params=params, policy=FullRecompute())
        reference[seeds[0]] = images
        return images

    def report(name: str, generate) -> dict:
        def step(done: int, total: int) -> None:
            if progress is not None:
                progress(name, done, total)

        result = evaluate(generate, num=num, seed=seed, batch_size=batch_size, progress=step)
        return {"name": name, **result.to_dict()}

    rows = [{**report("MAR (exact)", baseline), "marche": None, "psnr_vs_mar_db": None}]
    for name, knobs in variants.items():
        psnrs: list[float] = []
        row = report(name, _marche_vs(pipe, params, knobs, reference, psnrs))
        rows.append({**row, "marche": knobs.__dict__, "psnr_vs_mar_db": sum(psnrs) / len(psnrs)})
    return rows


def _marche_vs(
    pipe: Pipeline,
    params: SamplingParams,
    knobs: MarcheConfig,
    reference: dict[int, Tensor],
    psnrs: list[float],
) -> Callable[[Tensor, list[int]], Tensor]:
    """A generate function for MARché with `knobs` that appends per-image PSNR vs MAR."""

    def generate(labels: Tensor, seeds: list[int]) -> Tensor:
        images = pipe.generate(labels.tolist(), seeds, params=params, policy=Marche(knobs))
        psnrs.extend(psnr(images, reference[seeds[0]]).tolist())
        return images

    return generate
