"""KL-16 VAE: official key layout, tiny-VAE goldens, strict loading, and uint8 conversion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.model.checkpoint import CheckpointError
from engine.model.vae import KL16, LATENT_SCALE, AutoencoderKL, VAEConfig, load_vae, to_uint8


def reference_dir() -> Path:
    """Golden data: $MARCHE_REFERENCE_DIR, else `shared/reference/mar` beside the repo root."""
    env = os.environ.get("MARCHE_REFERENCE_DIR")
    repo_root = Path(__file__).resolve().parents[2]
    ref = Path(env) if env else repo_root.parent / "shared" / "reference" / "mar"
    if not ref.is_dir():
        pytest.skip(f"reference data not found at {ref}")
    return ref


def tiny_config() -> VAEConfig:
    meta = json.loads((reference_dir() / "tiny_vae_config.json").read_text())
    assert meta["decoder_attn_resolutions"] == []
    assert meta["groupnorm"] == {"num_groups": 32, "eps": 1e-06}
    return VAEConfig(
        embed_dim=meta["embed_dim"],
        ch=meta["ch"],
        ch_mult=tuple(meta["ch_mult"]),
        num_res_blocks=meta["num_res_blocks"],
        encoder_attn_resolutions=tuple(meta["encoder_attn_resolutions"]),
        resolution=meta["resolution"],
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_kl16_keys_shapes_and_param_counts() -> None:
    meta = json.loads((reference_dir() / "vae_kl16_keys.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL(KL16)
    got = [(k, list(v.shape)) for k, v in vae.state_dict().items()]
    assert got == [(k, list(shape)) for k, shape in meta["keys"]]
    assert len(got) == meta["num_state_dict_entries"] == 312
    assert list(vae.buffers()) == []
    assert n_params(vae) == meta["num_params"] == 66_456_019
    assert n_params(vae.encoder) == meta["num_params_encoder"] == 28_265_760
    assert n_params(vae.decoder) == meta["num_params_decoder"] == 38_188_931
    assert n_params(vae.quant_conv) == meta["num_params_quant_conv"]
    assert n_params(vae.post_quant_conv) == meta["num_params_post_quant_conv"]
    assert meta["mar_usage"]["latent_scale_factor"] == LATENT_SCALE


def test_tiny_config_matches_reference_keys() -> None:
    meta = json.loads((reference_dir() / "tiny_vae_config.json").read_text())
    assert tiny_config() == VAEConfig(ch=32)
    with torch.device("meta"):
        vae = AutoencoderKL(tiny_config())
    got = [(k, list(v.shape)) for k, v in vae.state_dict().items()]
    assert got == [(k, list(s)) for k, s in meta["state_dict_keys_in_official_order"]]
    assert n_params(vae) == meta["num_params"]


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    return load_vae(reference_dir() / "tiny_vae_weights.safetensors", config=tiny_config())


@pytest.fixture(scope="module")
def tiny_golden() -> dict[str, torch.Tensor]:
    return {
        k: v.float() for k, v in load_file(reference_dir() / "tiny_vae_decode.safetensors").items()
    }


def test_tiny_decode_matches_golden(tiny_vae: AutoencoderKL, tiny_golden: dict) -> None:
    assert not tiny_vae.training
    assert all(p.dtype == torch.float32 for p in tiny_vae.parameters())
    with torch.no_grad():
        image = tiny_vae.decode(tiny_golden["decode.latent"])
    assert image.shape == (1, 3, 128, 128)
    torch.testing.assert_close(image, tiny_golden["decode.image"], atol=5e-5, rtol=0)


def test_tiny_encode_matches_golden(tiny_vae: AutoencoderKL, tiny_golden: dict) -> None:
    with torch.no_grad():
        mean, logvar = tiny_vae.encode(tiny_golden["encode.image"])
        moments = tiny_vae.quant_conv(tiny_vae.encoder(tiny_golden["encode.image"]))
    assert mean.shape == logvar.shape == (1, 16, 8, 8)
    torch.testing.assert_close(moments, tiny_golden["encode.moments"], atol=1e-5, rtol=0)
    torch.testing.assert_close(mean, tiny_golden["encode.mean"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logvar, tiny_golden["encode.logvar_clamped"], atol=1e-5, rtol=0)


def test_encode_clamps_logvar(tiny_vae: AutoencoderKL) -> None:
    with torch.no_grad():
        tiny_vae.quant_conv.bias[16:] += 100.0
        try:
            _, logvar = tiny_vae.encode(torch.zeros(1, 3, 16, 16))
        finally:
            tiny_vae.quant_conv.bias[16:] -= 100.0
    assert torch.all(logvar == 20.0)


def test_load_vae_strictness(tmp_path: Path) -> None:
    sd = load_file(reference_dir() / "tiny_vae_weights.safetensors")
    config = tiny_config()

    ckpt = tmp_path / "kl16.ckpt"
    torch.save({"model": sd}, ckpt)
    rng = torch.get_rng_state()
    vae = load_vae(ckpt, config=config)
    assert torch.equal(torch.get_rng_state(), rng)  # no random init is run
    torch.testing.assert_close(
        vae.state_dict()["decoder.conv_out.weight"],
        sd["decoder.conv_out.weight"].float(),
    )

    missing = dict(sd)
    del missing["decoder.up.2.upsample.conv.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(
        CheckpointError, match=r"missing keys: decoder\.up\.2\.upsample\.conv\.bias"
    ):
        load_vae(tmp_path / "missing.safetensors", config=config)

    extra = dict(sd)
    extra["decoder.up.0.upsample.conv.bias"] = torch.zeros(32, dtype=torch.float16)
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.up\.0\.upsample"):
        load_vae(tmp_path / "extra.safetensors", config=config)

    torch.save({"model": missing}, tmp_path / "missing.ckpt")
    with pytest.raises(
        CheckpointError, match=r"missing keys: decoder\.up\.2\.upsample\.conv\.bias"
    ):
        load_vae(tmp_path / "missing.ckpt", config=config)

    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_vae(ckpt, config=VAEConfig(ch=32, embed_dim=8))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-1.0, 0),
        (1.0, 255),
        (0.0, 128),  # 127.5 rounds half to even -> 128
        (-3.0, 0),
        (2.5, 255),
        (-1.0 + 2.0 / 255.0, 1),
        (1.0 - 2.0 / 255.0, 254),
        (0.5, 191),  # 191.25
    ],
)
def test_to_uint8_table(value: float, expected: int) -> None:
    out = to_uint8(torch.full((1, 3, 2, 2), value))
    assert out.dtype == torch.uint8
    assert out.shape == (1, 2, 2, 3)
    assert torch.all(out == expected)


def test_to_uint8_matches_official_numpy_formula() -> None:
    """engine_mar.evaluate: np.round(np.clip(((img + 1) / 2).numpy() * 255, 0, 255))."""
    x = torch.linspace(-1.1, 1.1, 200_001, dtype=torch.float32).reshape(1, 1, 1, -1)
    ref = np.round(np.clip(((x + 1) / 2).numpy() * 255, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(x).numpy(), ref.transpose(0, 2, 3, 1))


def test_to_uint8_layout() -> None:
    img = torch.zeros(2, 3, 4, 5)
    img[1, 2, 3, 4] = 1.0
    out = to_uint8(img)
    assert out.shape == (2, 4, 5, 3)
    assert out[1, 3, 4, 2] == 255 and out[1, 3, 4, 1] == 128 and out[0, 3, 4, 2] == 128
