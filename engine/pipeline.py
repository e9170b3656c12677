"""A loaded model ready to generate images: MAR + tokenizer on a device, by model name.

`Pipeline.load("digits")` gives the shipped model; `Pipeline.load("mar_base", checkpoint=...,
vae=...)` an official one; `random_weights=True` builds official sizes untrained (timing only:
speed does not depend on weight values).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from engine.decode.policy import PRESETS, DecodeConfig, DecodePolicy
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.decode.randomness import SeededRandomness, request_randomness
from engine.decode.sampler import StepInfo, sample_tokens
from engine.decode.step import Row, StepEngine
from engine.decode.units.build import AUTO, build_units, sized_buckets
from engine.decode.units.common import DecodeUnits
from engine.hub import VAE, find_weights
from engine.labels import ClassNames, digit_classes, imagenet_classes
from engine.model.checkpoint import load_strict, read_state_dict
from engine.model.config import MAR_CONFIGS, MARConfig, SamplingParams
from engine.model.mar import MAR
from engine.model.tokenizer import KL16Tokenizer, PixelTokenizer, Tokenizer
from engine.model.vae import KL16, AutoencoderKL, load_vae

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ModelSpec:
    """What a model name means: architecture, class labels, default sampling, shipped weights."""

    config: MARConfig
    classes: ClassNames
    defaults: SamplingParams
    weights: Path | None = None  # shipped with the package

    @property
    def labels(self) -> tuple[str, ...]:
        """Each class id's display name."""
        return self.classes.labels


MODELS: dict[str, ModelSpec] = {
    "digits": ModelSpec(
        MAR_CONFIGS["digits"],
        digit_classes(),
        SamplingParams(num_iter=128, cfg=5.0, cfg_schedule="linear", temperature=1.0),
        WEIGHTS_DIR / "digits.safetensors",
    ),
    # The README's evaluation settings (cfg 2.9 / 3.0 / 3.2, linear), at 64 steps.
    "mar_base": ModelSpec(MAR_CONFIGS["mar_base"], imagenet_classes(), SamplingParams(64, 2.9)),
    "mar_large": ModelSpec(MAR_CONFIGS["mar_large"], imagenet_classes(), SamplingParams(64, 3.0)),
    "mar_huge": ModelSpec(MAR_CONFIGS["mar_huge"], imagenet_classes(), SamplingParams(64, 3.2)),
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: bf16 on CUDA by default, fp32 on CPU (the exactness reference)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(dtypes)} or auto")
    return dtypes[dtype]


def weight_paths(
    name: str, checkpoint: str | Path | None = None, vae: str | Path | None = None
) -> tuple[str | Path, str | Path | None]:
    """The checkpoint and VAE (None: pixel tokens) to load for `name`: the paths given, else
    the shipped weights, else the cache `marche weights fetch` fills. A missing file raises
    `WeightsMissing`, one line naming the fetch command, before anything large is loaded."""
    spec = MODELS[name]
    needed = [name] if checkpoint is None and spec.weights is None else []
    needed += [VAE] if vae is None and spec.config.tokenizer != "pixels" else []
    cached = find_weights(needed)
    return checkpoint or spec.weights or cached[name], vae or cached.get(VAE)


def load_mar(config: MARConfig, path: str | Path, device: torch.device | str = "cpu") -> MAR:
    """Build `config` and load an official `checkpoint-last.pth` (EMA preferred) or safetensors."""
    state = read_state_dict(path, prefer=("model_ema", "model"))
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = MAR(config)
    model = model.to_empty(device="cpu")
    load_strict(model, {k: v.float() for k, v in state.items()}, what=f"checkpoint {path}")
    return model.to(device).eval()


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every `nn.Linear`'s weight and bias in `dtype`, the autocast dtype (bf16 on a GPU),
    once at load: autocast would cast them to it on every call (a pass over every weight per
    call), with the same rounding, so tokens are unchanged. Norms, embeddings and the
    residual stream stay fp32, and so do the head's adaLN modulations: they run once per AR
    step, with the 1 of (1 + scale) folded into their bias, which bf16 would round before the
    1 is added. fp32: nothing to do. Returns the tensors cast."""
    if dtype == torch.float32:
        return 0
    cast = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "adaLN_modulation" not in name:
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
                cast += 1
    return cast


class Pipeline:
    def __init__(
        self, name: str, model: MAR, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.name, self.spec = name, MODELS[name]
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype = device, dtype
        self.units = DecodeUnits()  # the phases that run as units (`use_units`); none: eager

    def use_units(
        self,
        mode: str = "auto",
        head_buckets: str | Sequence[int] = AUTO,
        pass_buckets: str | Sequence[int] = AUTO,
        guided: Sequence[bool] = (True, False),
        max_batch_size: int = 16,
    ) -> None:
        """Run the diffusion head and the transformer's passes as units per bucket
        (engine/decode/units/): "cuda-graphs", "compile" (inductor), "static", "off", or
        "auto" (CUDA graphs where they measure faster than eager on this device; elsewhere
        eager). Builds them now; the head's for `guided` (cfg != 1) rows, unguided ones, or
        both. Buckets "auto" hold every call of a batch of `max_batch_size` images of any
        mode at the model's default steps (`units/build.py`)."""
        sized = sized_buckets(
            self.model.config.seq_len, self.spec.defaults.num_iter, max_batch_size,
            PRESETS.values(),
        )  # fmt: skip
        head_buckets = sized[0] if head_buckets == AUTO else head_buckets
        pass_buckets = sized[1] if pass_buckets == AUTO else pass_buckets
        with self.autocast():
            units = build_units(
                self.model, mode, PRESETS.values(), head_buckets, pass_buckets, guided
            )
        self.units = units or DecodeUnits()

    @classmethod
    def load(
        cls,
        name: str = "digits",
        checkpoint: str | Path | None = None,
        vae: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        random_weights: bool = False,
        units: str = "off",
        head_buckets: str | Sequence[int] = AUTO,
        pass_buckets: str | Sequence[int] = AUTO,
        max_batch_size: int = 16,
    ) -> Pipeline:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        spec, dev = MODELS[name], resolve_device(device)
        config = spec.config
        if random_weights:  # initialised where it runs: MAR-H's 0.9 G weights in seconds on a GPU
            with dev:
                model = MAR(config)
            model = model.to(dev).eval()
        else:
            checkpoint, vae = weight_paths(name, checkpoint, vae)
            model = load_mar(config, checkpoint, dev)
        tokenizer: Tokenizer
        if config.tokenizer == "pixels":
            tokenizer = PixelTokenizer(config)
        elif vae is not None:
            tokenizer = KL16Tokenizer(config, load_vae(vae, KL16, dev))
        else:  # random weights: an untrained VAE
            with dev:
                vae_model = AutoencoderKL(KL16)
            tokenizer = KL16Tokenizer(config, vae_model.to(dev).eval())
        pipeline = cls(name, model, tokenizer, dev, resolve_dtype(dtype, dev))
        cast_matmul_weights(model, pipeline.dtype)
        if units != "off":
            pipeline.use_units(units, head_buckets, pass_buckets, max_batch_size=max_batch_size)
        return pipeline

    @property
    def num_classes(self) -> int:
        return self.model.config.class_num

    def check_class_ids(self, class_ids: Sequence[int]) -> None:
        for c in class_ids:
            if not 0 <= int(c) < self.num_classes:
                raise ValueError(
                    f"class_id {c} is out of range for {self.name}: 0..{self.num_classes - 1}"
                )

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def generate_tokens(
        self,
        class_ids: Sequence[int],
        seeds: Sequence[int],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        policy: DecodePolicy | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
        timer: PhaseTimer | NullTimer = NULL_TIMER,
    ) -> Tensor:
        """Tokens (B, L, C) for one batch; one seed (and optionally params) per image."""
        self.check_class_ids(class_ids)
        if len(seeds) != len(class_ids):
            raise ValueError("one seed per image is needed")
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.spec.defaults] * len(class_ids)
        config = self.model.config
        randomness = request_randomness(
            seeds,
            config.seq_len,
            config.token_embed_dim,
            self.model.diffloss.gen_schedule.num_timesteps,
            self.device,
        )
        labels = torch.tensor([int(c) for c in class_ids], dtype=torch.long, device=self.device)
        with self.autocast():
            return sample_tokens(
                self.model,
                labels,
                params,
                randomness,
                policy,
                on_step,
                timer,
                self.units,
            )

    # -- step-level API (continuous batching): rows join and leave a StepEngine at any step --

    def step_engine(self, capacity: int) -> StepEngine:
        """A step engine whose cache pool holds `capacity` images."""
        return StepEngine(self.model, capacity, self.device, self.units)

    def admit(
        self,
        engine: StepEngine,
        class_id: int,
        seed: int,
        params: SamplingParams,
        config: DecodeConfig,
    ) -> Row:
        """One image as a row of `engine`, with the same randomness `generate` gives it."""
        self.check_class_ids([class_id])
        seq_len, dim = self.model.config.seq_len, self.model.config.token_embed_dim
        steps = self.model.diffloss.gen_schedule.num_timesteps
        randomness = SeededRandomness(seed, seq_len, dim, steps, self.device)
        return engine.admit(int(class_id), params, config, randomness)

    def step(self, engine: StepEngine, rows: Sequence[Row]) -> None:
        """Advance `rows` one step each (under the pipeline's autocast)."""
        with self.autocast():
            engine.step(rows)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens -> images (B, ch, H, W), float in [-1, 1] (not yet clipped)."""
        with self.autocast():
            return self.tokenizer.decode(tokens).float()

    def generate(self, class_ids: Sequence[int], seeds: Sequence[int], **kwargs) -> Tensor:
        return self.decode(self.generate_tokens(class_ids, seeds, **kwargs))
