"""Model architectures and sampling parameters.

One frozen `MARConfig` per model size holds every shape needed to rebuild the weights
(including the DiffLoss head's depth and width, which upstream MAR leaves to CLI flags), so a
model name plus a checkpoint is enough to load a model. Sampling knobs live apart in
`SamplingParams`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CFG_SCHEDULES = ("linear", "constant")


@dataclass(frozen=True)
class MARConfig:
    """Architecture of a MAR model (names follow LTH14/mar's `MAR.__init__`)."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    diffloss_d: int
    diffloss_w: int
    img_size: int = 256
    vae_stride: int = 16  # image pixels per latent pixel (1 for a pixel tokenizer)
    patch_size: int = 1  # latent pixels per token side
    vae_embed_dim: int = 16  # latent channels (image channels for a pixel tokenizer)
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    class_num: int = 1000
    buffer_size: int = 64
    num_sampling_steps: str = "100"  # a string, as upstream's `space_timesteps` wants
    tokenizer: str = "kl16"  # "kl16" (VAE latents) or "pixels" (raw pixel patches)

    @property
    def seq_h(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_w(self) -> int:
        return self.seq_h

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_w

    @property
    def token_embed_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size**2


def _official(name: str, dim: int, depth: int, heads: int, diff_d: int, diff_w: int) -> MARConfig:
    return MARConfig(
        name=name,
        encoder_embed_dim=dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        decoder_embed_dim=dim,
        decoder_depth=depth,
        decoder_num_heads=heads,
        diffloss_d=diff_d,
        diffloss_w=diff_w,
    )


# The released ImageNet 256x256 models (KL-16 latents, 16x16 = 256 tokens of dim 16).
MAR_BASE = _official("mar_base", 768, 12, 12, 6, 1024)
MAR_LARGE = _official("mar_large", 1024, 16, 16, 8, 1280)
MAR_HUGE = _official("mar_huge", 1280, 20, 16, 12, 1536)

# The golden-data model of ../shared/reference/mar (tiny_config.json): 8x8 = 64 tokens.
MAR_TINY = MARConfig(
    name="mar_tiny",
    encoder_embed_dim=64,
    encoder_depth=2,
    encoder_num_heads=4,
    decoder_embed_dim=64,
    decoder_depth=2,
    decoder_num_heads=4,
    diffloss_d=2,
    diffloss_w=64,
    img_size=128,
    class_num=10,
    buffer_size=16,
)

# Our shipped model: sklearn digits upsampled to 32x32 grey, 2x2 pixel patches -> a 16x16 grid
# of 256 tokens of dim 4, the same token grid as ImageNet MAR, so MARché budgets carry over.
MAR_DIGITS = MARConfig(
    name="digits",
    encoder_embed_dim=96,
    encoder_depth=2,
    encoder_num_heads=4,
    decoder_embed_dim=96,
    decoder_depth=3,
    decoder_num_heads=4,
    diffloss_d=2,
    diffloss_w=96,
    img_size=32,
    vae_stride=1,
    patch_size=2,
    vae_embed_dim=1,
    class_num=10,
    buffer_size=16,
    tokenizer="pixels",
    # Upstream's "100" respacing keeps t=999, where alpha_bar = 2.4e-9 makes the first DDPM step
    # multiply the head's eps error by ~300: a small head's tiny errors become +-1000 pixel
    # speckle. Upstream's "ddimN" respacing (every 20th step from 0) drops that step.
    num_sampling_steps="ddim50",
)

MAR_CONFIGS: dict[str, MARConfig] = {
    c.name: c for c in (MAR_BASE, MAR_LARGE, MAR_HUGE, MAR_TINY, MAR_DIGITS)
}


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled. Requests batched together share `num_iter`."""

    num_iter: int = 64  # autoregressive steps
    cfg: float = 1.0  # classifier-free guidance scale (1.0 = no guidance)
    cfg_schedule: str = "linear"
    temperature: float = 1.0  # scales the per-step diffusion noise only

    def __post_init__(self) -> None:
        if self.num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {self.num_iter}")
        if not math.isfinite(self.cfg) or self.cfg < 0:
            raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(
                f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate: the unit the sampler batches."""

    class_id: int
    seed: int
    params: SamplingParams = field(default_factory=SamplingParams)
