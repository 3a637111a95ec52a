"""The quality profile (issue #20, configs/quality.yaml): it loads through the strict params schema,
and the models it builds fit 128 px: the /4 tiny VAE gives a 32 x 32 latent, the landmark guider's
map has the latent's grid, the UNet sees as many patch tokens as the default's 64 px, and an untrained
pipeline generates 128 px frames (one denoising step)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from conftest import tiny

from mcdm.config import deep_merge, profile_params
from mcdm.models.vae import encode_latents
from mcdm.train.builders import build_untrained_pipeline

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def params():
    base = profile_params("quality", ROOT / "configs").model_dump(mode="json")
    few = {"train": {s: {"steps": 1} for s in ("stage1", "stage2", "stage3")},
           "base_models": {"vae_steps": 1, "unet_steps": 1}, "eval": {"steps": 1}}
    return tiny(deep_merge(base, few))


def test_quality_profile_is_128_px_with_the_attempts_autoencoder():
    p = profile_params("quality", ROOT / "configs")
    assert p.data.resolution == 128 and p.base_models.vae_block_out_channels == [8, 16, 32]
    assert p.model.patch_size == 8 and len(p.model.landmark_guider_channels) == 3
    # four UNet levels (32 -> 4) with attention only at the two lowest (8 x 8 and 4 x 4)
    assert len(p.model.block_out_channels) == 4
    assert p.model.down_block_types[:2] == ["DownBlock2D"] * 2 and p.model.up_block_types[2:] == ["UpBlock2D"] * 2
    default = profile_params("default", ROOT / "configs")
    assert default.data.resolution == 64  # the embedded default stays within the 2-core budget


def test_quality_models_have_the_128_px_shapes(params):
    pipe = build_untrained_pipeline(params)
    face = skimage.data.astronaut()[20:260, 100:340]
    crop = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(face).permute(2, 0, 1)[None].float(),
                                                      size=(128, 128), mode="area")[0].permute(1, 2, 0).round(),
                      np.uint8)
    latent = encode_latents(pipe.vae, crop[None])
    assert tuple(latent.shape) == (1, 4, 32, 32)
    side = latent.shape[-1] // params.model.patch_size
    assert side * side == 16  # m tokens, as at 64 px with the /8 VAE and patch 2
    with torch.no_grad():
        guide = pipe.landmark_guider(torch.zeros(1, 1, 128, 128))
    # added to the UNet's first features in stage 1: the latent's grid, the UNet's first width
    assert tuple(guide.shape) == (1, params.model.block_out_channels[0], 32, 32)
    n = params.model.clip_frames
    audio = (0.1 * np.sin(2 * np.pi * 200 * np.arange(int(n / params.data.fps * 16000)) / 16000)).astype(np.float32)
    frames = pipe.generate_batch(crop[None], [audio], n, num_inference_steps=1, progress=False,
                                 generator=torch.Generator().manual_seed(0))
    assert frames.shape == (1, n, 128, 128, 3) and frames.dtype == np.uint8
