"""Quality ablations on the shipped digits model: every decoding knob alone, and the presets.

One process, one set of seeds: exact MAR first (its images are kept as the PSNR reference),
then each variant. Every row is the `engine.eval.quality` report of that decoding config plus
the mean per-image PSNR against MAR on the same seeds, the Fréchet distance's spread over the
seeds (`frechet_sd`) and a two-sample test of the variant's images against MAR's (`drift_p`,
engine/eval/drift.py). Three sets:

* `marche`: MARché with its defaults and the paper's ablations (Tables 2-3, our data);
* `turbo`: each acceleration knob alone (condition cache, head step schedules, head cache) and
  the presets `marche` and `turbo`;
* `gtr`: GtR's two-stage order and FTS on turbo: the candidates the `quality` and `fast`
  presets were chosen from (docs/ENGINE.md, "GtR").

A 500-image row takes ~25 min of a 2-core CPU, so a full set can be split over several runs:
with `reference`, MAR's images and row are saved there once and reused by later runs with the
same settings (`--only` then picks the rows), and `merge_rows` folds each run's rows into one
report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from engine.decode.gtr import FtsConfig, GtrConfig
from engine.decode.head import HeadConfig
from engine.decode.marche import MarcheConfig
from engine.decode.policy import PRESETS, DecodeConfig, make_policy
from engine.eval.drift import drift_test, frechet_spread
from engine.eval.quality import NUM_CLASSES, default_split, evaluate, judge_features, psnr
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline

ABLATION_SETS = ("marche", "turbo", "gtr")


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


def gtr_ablations() -> dict[str, DecodeConfig]:
    """GtR on turbo: the candidates the presets were chosen from on 1,000 digits (named as in
    docs/results/ablations_gtr_1000.json; the first 500-image search, whose picks did not hold
    on other seeds, is docs/results/ablations_gtr_500.json with each row's knobs)."""
    turbo = PRESETS["turbo"]
    return {
        "turbo (preset)": turbo,
        "turbo + fts": replace(turbo, fts=FtsConfig()),
        "turbo + gtr (S 1/2, K 16)": replace(turbo, gtr=GtrConfig(0.5, 16)),
        "turbo + gtr (S 1/2, K 16) + fts": PRESETS["quality"],
        "turbo + gtr (S 1/2, K 8)": PRESETS["fast"],
        "turbo + gtr (S 3/8, K 8)": replace(turbo, gtr=GtrConfig(0.375, 8)),
    }


def variant_set(name: str, base: MarcheConfig | None = None) -> dict[str, DecodeConfig]:
    if name == "marche":
        return ablations(base)
    if name == "turbo":
        return turbo_ablations()
    if name == "gtr":
        return gtr_ablations()
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
    reference_path: Path | None = None,
) -> list[dict]:
    """Rows [MAR, *variants]: name, knobs, the quality report, psnr_vs_mar_db (None for MAR).
    With `reference_path`, MAR's row and images come from there when it holds this run's
    settings, and are saved there otherwise."""
    variants = ablations() if variants is None else variants
    reference: dict[int, Tensor] = {}  # first seed of a batch -> MAR images of that batch
    settings = {"params": asdict(params), "num": num, "seed": seed, "batch_size": batch_size}

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

    saved = load_reference(reference_path, settings) if reference_path is not None else None
    if saved is not None:
        mar_row, reference = saved
        if progress is not None:
            progress(mar_row["name"], num, num)
    else:
        mar_row = {**report("MAR (exact)", baseline), "decoding": None, "psnr_vs_mar_db": None}
        if reference_path is not None:
            save_reference(reference_path, settings, mar_row, reference)
    noise = _Noise(num, reference)
    rows = [{**mar_row, **noise.of(noise.mar)}]
    for name, config in variants.items():
        psnrs: list[float] = []
        images: dict[int, Tensor] = {}
        row = report(name, _versus_mar(pipe, params, config, reference, psnrs, images))
        feats = judge_features(_in_seed_order(images))
        rows.append({**row, "decoding": asdict(config), "psnr_vs_mar_db": sum(psnrs) / len(psnrs),
                     **noise.of(feats, versus_mar=True)})  # fmt: skip
    return rows


class _Noise:
    """What a row's Fréchet distance is worth (engine/eval/drift.py): its spread over the
    seeds (`frechet_sd`, from 4 images a class) and, against MAR's images on the same seeds,
    the two-sample test (`drift_frechet`, `drift_p`, `drift_null_95`)."""

    def __init__(self, num: int, reference: dict[int, Tensor]) -> None:
        self.labels = np.arange(num) % NUM_CLASSES
        self.real = judge_features(default_split().test_images, generated=False)
        self.mar = judge_features(_in_seed_order(reference))

    def of(self, feats: np.ndarray, versus_mar: bool = False) -> dict:
        """The columns of a row whose images have the judge's features `feats`."""
        enough = len(self.labels) >= 4 * NUM_CLASSES
        out = {"frechet_sd": frechet_spread(feats, self.labels, self.real) if enough else None}
        if versus_mar:
            drift = drift_test(feats, self.mar)
            out.update(drift_frechet=drift.frechet, drift_p=drift.p, drift_null_95=drift.null_95)
        return out


def _in_seed_order(batches: dict[int, Tensor]) -> Tensor:
    """One (n, ...) tensor of batches keyed by their first seed."""
    return torch.cat([batches[first] for first in sorted(batches)])


def _versus_mar(
    pipe: Pipeline,
    params: SamplingParams,
    config: DecodeConfig,
    reference: dict[int, Tensor],
    psnrs: list[float],
    kept: dict[int, Tensor],
) -> Callable[[Tensor, list[int]], Tensor]:
    """A generate function for `config` that appends per-image PSNR vs MAR and keeps the
    images (by the first seed of their batch)."""

    def generate(labels: Tensor, seeds: list[int]) -> Tensor:
        images = pipe.generate(labels.tolist(), seeds, params=params, policy=make_policy(config))
        psnrs.extend(psnr(images, reference[seeds[0]]).tolist())
        kept[seeds[0]] = images.detach().cpu()
        return images

    return generate


def save_reference(path: Path, settings: dict, row: dict, images: dict[int, Tensor]) -> None:
    """MAR's images (one tensor per batch, keyed by its first seed) and row, with the settings
    that made them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"seed_{first}": batch.contiguous() for first, batch in images.items()}
    meta = {"settings": json.dumps(settings, sort_keys=True), "row": json.dumps(row)}
    save_file(tensors, str(path), metadata=meta)


def load_reference(path: Path, settings: dict) -> tuple[dict, dict[int, Tensor]] | None:
    """(MAR row, images) saved at `path` for exactly these settings; None if absent or other."""
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:  # one read: settings, then the images
        meta = f.metadata() or {}
        if meta.get("settings") != json.dumps(settings, sort_keys=True):
            return None
        images = {int(k.removeprefix("seed_")): f.get_tensor(k) for k in f.keys()}
    return json.loads(meta["row"]), images


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with each row of `new` replacing the row of the same name, or appended."""
    merged = {row["name"]: row for row in old}
    merged.update({row["name"]: row for row in new})
    return list(merged.values())
