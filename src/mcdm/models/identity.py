"""Frozen identity encoders of the reference image (decisions.md #2).

- ``clip``: ``CLIPVisionModelWithProjection.from_pretrained(local)`` image embedding;
- ``dlib+vae`` (the labelled fallback): dlib's pretrained 128-d face descriptor concatenated with the
  tiny VAE's latent mean average-pooled to 2 x 2.

Both are callables ``(rgb crop, landmarks (68, 2) or None) -> (dim,)`` with a ``name`` label.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import CLIPVisionModelWithProjection

from mcdm.errors import McdmError
from mcdm.face.dlib import DlibFace
from mcdm.models.loading import load_transformers_folder

# =============================================================================================
# Identity / reference image: CLIP, or dlib descriptor + pooled VAE latent
# =============================================================================================
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipIdentity:
    """Frozen CLIP vision tower with projection from a local folder: ``image_embeds`` (projection_dim,)."""

    name = "clip"

    def __init__(self, model: CLIPVisionModelWithProjection, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        self.model = model.eval().requires_grad_(False)
        self.device = model.device
        self.dim = int(model.config.projection_dim)
        self.size = int(model.config.image_size)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def from_folder(cls, path: str | Path, device: str | torch.device = "cpu") -> "ClipIdentity":
        """A local ``save_pretrained`` folder (safetensors weights; a pickled ``.bin`` is refused)."""
        model, pre = load_transformers_folder(CLIPVisionModelWithProjection, path, "base_models.clip_path", device)
        return cls(model, pre.get("image_mean", OPENAI_CLIP_MEAN), pre.get("image_std", OPENAI_CLIP_STD))

    @classmethod
    def from_model(cls, model: CLIPVisionModelWithProjection) -> "ClipIdentity":
        """A loaded model (a pipeline component), with OpenAI CLIP's normalisation."""
        return cls(model)

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, landmarks: Optional[np.ndarray] = None) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(rgb)).float().div(255.0)
        x = rearrange(x, "h w c -> 1 c h w")
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.device)
        return self.model(pixel_values=x).image_embeds[0].float().cpu().numpy()


class DlibVaeIdentity:
    """Fallback identity backend (decisions.md #2), label ``dlib+vae``: dlib's pretrained 128-d face
    descriptor concatenated with the tiny VAE's latent mean, average-pooled to 2 x 2 (4 * latent ch)."""

    name = "dlib+vae"

    def __init__(self, vae, device: str | torch.device = "cpu"):
        self.face = DlibFace()
        self.vae = vae.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.dim = 128 + 4 * int(vae.config.latent_channels)

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, landmarks: Optional[np.ndarray] = None) -> np.ndarray:
        box = None
        if landmarks is not None:
            lo, hi = np.asarray(landmarks).min(0), np.asarray(landmarks).max(0)
            pad = 0.1 * (hi - lo)
            h, w = rgb.shape[:2]
            box = (int(max(lo[0] - pad[0], 0)), int(max(lo[1] - pad[1], 0)), int(min(hi[0] + pad[0], w - 1)), int(min(hi[1] + pad[1], h - 1)))
        desc = self.face.descriptor(rgb, box)
        if desc is None:
            raise McdmError("identity embedding: no face found in the reference image")
        x = torch.as_tensor(np.ascontiguousarray(rgb)).float().div(127.5).sub(1.0)
        x = rearrange(x, "h w c -> 1 c h w").to(self.device, self.vae.dtype)
        latent = self.vae.encode(x).latent_dist.mean * float(getattr(self.vae.config, "scaling_factor", 1.0))
        pooled = F.adaptive_avg_pool2d(latent.float(), 2).flatten().cpu().numpy()
        return np.concatenate([desc.astype(np.float32), pooled.astype(np.float32)])
