"""base_models units: the tiny VAE and its PSNR gate, the latent scale, the SD-shaped UNet pretraining,
the reference tokens and the one loader (end to end on crop clips: tests/test_features.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mcdm.config import Params
from mcdm.errors import McdmError
from mcdm.media import layout
from mcdm.models.frozen import load_frozen_encoders
from mcdm.models.reference_tokens import ReferenceTokens
from mcdm.models.schedulers import SD15_SCHEDULER, make_scheduler
from mcdm.models.vae import encode_latents, load_vae, psnr, reconstruct, to_model_range, to_uint8
from mcdm.pipelines.loading import load_base_models, load_unet
from mcdm.train.base_models.unet import train_unet
from mcdm.train.base_models.vae import VaePsnrNotReached, train_vae
from mcdm.train.builders import tiny_unet_config, tiny_vae_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_params(**base_models) -> Params:
    p = Params()
    p.base_models = p.base_models.model_copy(update={
        "vae_block_out_channels": [8, 16, 16, 16], "vae_norm_num_groups": 8, "batch_size": 8, "lr": 2e-3,
        "vae_eval_every": 25, "unet_batch_size": 8, "threads": 1, **base_models,
    })
    return p


def easy_frames(n: int, seed: int, side: int = 32) -> np.ndarray:
    """Smooth images (bilinear blow-ups of random 3x3 colour fields): easy to reconstruct."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(30, 225, (n, 3, 3, 3)).astype(np.uint8)
    return np.stack([cv2.resize(s, (side, side), interpolation=cv2.INTER_LINEAR) for s in small])


def test_psnr_matches_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 16, 16, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
    assert psnr(a, a) == float("inf")


def test_model_range_round_trip():
    x = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    t = to_model_range(x)
    assert t.shape == (2, 3, 8, 8) and float(t.min()) >= -1 and float(t.max()) <= 1
    np.testing.assert_array_equal(to_uint8(t), x)


def test_tiny_vae_maps_64px_to_4x8x8():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**tiny_vae_config(Params().base_models, 64))
    z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 8, 8)
    with pytest.raises(McdmError, match="vae_norm_num_groups"):
        tiny_vae_config(tiny_params(vae_norm_num_groups=3).base_models, 64)


def test_psnr_gate_passes_with_enough_steps_and_sets_the_latent_scale():
    # 32 px frames and a 3-block VAE (4x downsampling) keep this fast; the gate logic is the same
    params = tiny_params(vae_block_out_channels=[8, 16, 16], vae_norm_num_groups=2, vae_steps=120,
                         vae_min_steps=0, vae_eval_every=10, vae_psnr_threshold=16.0, lr=3e-3)
    fit, held = easy_frames(256, seed=0), easy_frames(32, seed=1)
    vae, report = train_vae(fit, held, params.base_models, 32, progress=False)
    assert report.passed and report.psnr >= 16.0, report.history
    assert report.steps == report.history[-1]["step"] and report.steps < 120  # stopped at the first passing check
    assert all(h["psnr"] < 16.0 for h in report.history[:-1])
    # the gate measures what it says: PSNR of the deterministic reconstruction of the held-out frames
    assert psnr(held, reconstruct(vae, held)) == pytest.approx(report.psnr, abs=1e-3)
    report.require_threshold()  # no error
    # SD convention: scaling_factor = 1 / std of the training latents (posterior means)
    with torch.no_grad():
        z = vae.encode(to_model_range(fit)).latent_dist.mean.numpy()
    assert vae.config.scaling_factor == pytest.approx(1.0 / z.std(ddof=1), rel=1e-4)
    assert float(encode_latents(vae, fit).std()) == pytest.approx(1.0, rel=1e-3)


def test_psnr_gate_fails_after_one_step_with_one_line():
    params = tiny_params(vae_block_out_channels=[8, 16, 16], vae_norm_num_groups=2, vae_steps=1,
                         vae_psnr_threshold=15.0)
    _, report = train_vae(easy_frames(16, 0), easy_frames(8, 1), params.base_models, 32, progress=False)
    assert not report.passed and report.steps == 1
    with pytest.raises(VaePsnrNotReached) as err:
        report.require_threshold()
    msg = str(err.value)
    assert "\n" not in msg
    assert f"PSNR {report.psnr:.2f} dB" in msg and "vae_psnr_threshold 15 dB" in msg and "after 1 steps" in msg


def test_unet_is_sd_shaped_and_learns_to_denoise_from_a_reference():
    from diffusers import UNet2DConditionModel

    params = tiny_params(unet_steps=150, unet_lr=2e-3)
    params.model = params.model.model_copy(update={"block_out_channels": [16, 32], "attention_head_dim": 2})
    cfg = tiny_unet_config(params.model, 8)
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert cfg["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D"]
    assert cfg["cross_attention_dim"] == params.model.prior_dim
    # the params' block types, where set, shape the base UNet (and so the denoiser built from it)
    four = params.model.model_copy(update={"block_out_channels": [8, 8, 16, 16], "attention_head_dim": 2,
                                           "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                                           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]})
    assert tiny_unet_config(four, 32)["down_block_types"] == four.down_block_types
    assert tiny_unet_config(four, 32)["up_block_types"] == four.up_block_types
    with pytest.raises(McdmError, match="model.down_block_types: 4 entries for 2 block_out_channels"):
        tiny_unet_config(four.model_copy(update={"block_out_channels": [8, 16]}), 32)
    # latents of 40 "clips": each clip one smooth pattern plus small per-frame noise
    g = torch.Generator().manual_seed(0)
    patterns = torch.nn.functional.interpolate(torch.randn(40, 4, 2, 2, generator=g), size=8, mode="bilinear")
    clip = np.repeat(np.arange(40), 8)
    latents = patterns[clip] + 0.05 * torch.randn(len(clip), 4, 8, 8, generator=g)
    fit = clip < 36
    unet, ref_tokens, scheduler, report = train_unet(
        latents[fit], clip[fit], latents[~fit], clip[~fit], params.base_models, params.model, progress=False)
    assert isinstance(unet, UNet2DConditionModel)
    assert unet.config.cross_attention_dim == params.model.prior_dim
    assert report.heldout_loss < 0.8 * report.heldout_loss_init, report.to_dict()
    assert report.heldout_loss < report.heldout_loss_wrong_ref, report.to_dict()  # it uses the reference
    assert dict(scheduler.config)["beta_schedule"] == SD15_SCHEDULER["beta_schedule"]
    assert scheduler.config.prediction_type == params.base_models.prediction_type == "v_prediction"


def test_reference_tokens_shape():
    tok = ReferenceTokens(latent_channels=4, sample_size=8, patch_size=2, dim=64)
    out = tok(torch.randn(3, 4, 8, 8))
    assert out.shape == (3, 16, 64) and tok.num_tokens == 16
    with pytest.raises(ValueError, match="patch_size"):
        ReferenceTokens(sample_size=8, patch_size=3)


def test_loader_round_trip_and_strictness(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    params = tiny_params()
    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny_vae_config(params.base_models, 64))
    vae.register_to_config(scaling_factor=0.7)
    unet = UNet2DConditionModel(**tiny_unet_config(params.model, 8))
    tok = ReferenceTokens()
    vae.save_pretrained(tmp_path / layout.VAE)
    unet.save_pretrained(tmp_path / layout.UNET)
    tok.save_pretrained(tmp_path / layout.REF_TOKENS)
    make_scheduler().save_pretrained(tmp_path / layout.SCHEDULER)
    (tmp_path / layout.ENCODERS_JSON).write_text(json.dumps({"audio": {"backend": "logmel", "dim": 80},
                                                                "image": {"backend": "dlib+vae", "dim": 144}}))
    base = load_base_models(tmp_path)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z, t, e = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16, 64)
    with torch.no_grad():
        assert torch.equal(base.vae.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
        assert torch.equal(base.unet(z, t, e).sample, unet(z, t, e).sample)
        assert torch.equal(base.ref_tokens(z), tok(z))
    assert base.vae.config.scaling_factor == 0.7 and base.latent_shape == (4, 8, 8)
    assert not any(p.requires_grad for p in base.vae.parameters())
    assert load_frozen_encoders(**layout.frozen_encoder_paths(tmp_path)).audio.name == "logmel"
    assert load_frozen_encoders(**layout.frozen_encoder_paths(tmp_path)).identity.name == "dlib+vae"
    # weights that do not match their config are refused
    bad = tmp_path / "bad"
    other = UNet2DConditionModel(**{**tiny_unet_config(params.model, 8), "cross_attention_dim": 32})
    other.save_pretrained(bad / layout.UNET)
    (bad / layout.UNET / "config.json").write_text((tmp_path / layout.UNET / "config.json").read_text())
    with pytest.raises((McdmError, ValueError, RuntimeError)):
        load_unet(bad)


def test_missing_stage_output_names_the_stage(tmp_path):
    with pytest.raises(McdmError, match="dvc repro base_models"):
        load_vae(layout.base_path(tmp_path, layout.VAE))


def test_given_unet_must_fit_the_vae_and_the_prior_width():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from mcdm.train.base_models.pretrain import check_unet_fits

    params = tiny_params()
    vae = AutoencoderKL(**tiny_vae_config(params.base_models, 64))
    wide = UNet2DConditionModel(**{**tiny_unet_config(params.model, 8), "cross_attention_dim": 32})
    with pytest.raises(McdmError, match="set model.prior_dim: 32"):
        check_unet_fits(wide, vae, params)
    check_unet_fits(UNet2DConditionModel(**tiny_unet_config(params.model, 8)), vae, params)
