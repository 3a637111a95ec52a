"""Archived-clip motion prior (paper Sec. 3.2): frame-aligned attention over frozen-VAE latents.

Inputs are latents of the frozen VAE (computed outside this module): the reference frame f_x
(b, 4, h/8, w/8) and ``a`` archived frames f_a (b, a, 4, h/8, w/8). Two learnable patchify layers
(2-D conv + flatten) turn them into tokens F_x (b, 1, m, d) and F_a (b, a, m, d). Frame-aligned
attention then mixes, for every archived frame i separately, the static reference (keys) with that
frame's dynamics (values), read out by n learnable queries:

    K_i = F_x W_K,  V_i = F_a^i W_V                              (Eq. 1)
    Attention(Q, K_i, V_i) = Softmax(Q K_i^T / sqrt(d)) V_i        (Eq. 2)

Output F_ac: (b, a, n, d). ``wo_fa`` (no archived frames) runs the same layers with the reference
standing in as the single archived frame: F_ac (b, 1, n, d) carries no history.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat

from mcdm.errors import McdmError


def sincos_2d(height: int, width: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (height*width, dim); half the channels per axis."""
    if dim % 4:
        raise McdmError(f"prior_dim must be a multiple of 4 for 2-D position embeddings (got {dim})")
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=like.device) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(height, device=like.device), torch.arange(width, device=like.device), indexing="ij"
    )
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None].float() * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).to(like.dtype)


def sincos_1d(length: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Fixed 1-D sine-cosine embedding of positions 0..length-1, (length, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=like.device) / max(half, 1))
    angles = torch.arange(length, device=like.device)[:, None].float() * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).to(like.dtype)


class Patchify(nn.Module):
    """2-D conv (kernel = stride = patch) + flatten: latent (N, c, h, w) -> tokens (N, m, d), m = (h/p)(w/p).

    A fixed 2-D position embedding is added so that queries can attend to places (mouth, eyes).
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h, w = latent.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise McdmError(f"patchify: latent side {h}x{w} is not a multiple of patch_size {self.patch_size}")
        x = self.proj(latent)
        tokens = rearrange(x, "n d h w -> n (h w) d")
        return tokens + sincos_2d(x.shape[-2], x.shape[-1], x.shape[1], tokens)


class FrameAlignedAttnProcessor:
    """Eq. 1-2 for a batch of (video, archived frame) pairs folded into the batch axis.

    hidden_states: the learnable queries Q (N, n, d); encoder_hidden_states: reference tokens F_x
    (N, m, d) -> keys; value_states: archived-frame tokens F_a^i (N, m, d) -> values.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        value_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or value_states is None:
            raise McdmError("frame-aligned attention needs reference tokens (keys) and archived tokens (values)")
        q = rearrange(attn.to_q(hidden_states), "n l (h d) -> n h l d", h=attn.heads)
        k = rearrange(attn.to_k(encoder_hidden_states), "n l (h d) -> n h l d", h=attn.heads)  # Eq. 1: K_i = F_x W_K
        v = rearrange(attn.to_v(value_states), "n l (h d) -> n h l d", h=attn.heads)  # Eq. 1: V_i = F_a^i W_V
        out = F.scaled_dot_product_attention(q, k, v)  # Eq. 2: Softmax(Q K_i^T / sqrt(d)) V_i
        out = rearrange(out, "n h l d -> n l (h d)")
        return attn.to_out[1](attn.to_out[0](out))


class ArchivedClipPrior(ModelMixin, ConfigMixin):
    """F_ac = frame-aligned attention(Q, patchify(f_x), patchify(f_a^i)) for i = 1..a.

    Args:
        latent_channels: VAE latent channels (4).
        prior_dim: d, the token width (the UNet's reference attentions read tokens of this width).
        patch_size: patchify stride; m = (h/8 / patch)^2 tokens per frame.
        num_queries: n learnable queries.
        heads: attention heads of the frame-aligned attention (1 = Eq. 2 exactly).
        use_archived_frames: False for ``wo_fa`` (reference only, no history).
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        prior_dim: int = 64,
        patch_size: int = 2,
        num_queries: int = 4,
        heads: int = 1,
        use_archived_frames: bool = True,
    ):
        super().__init__()
        if prior_dim % heads:
            raise McdmError(f"prior_dim {prior_dim} is not divisible by heads {heads}")
        self.patchify_reference = Patchify(latent_channels, prior_dim, patch_size)
        self.patchify_archived = Patchify(latent_channels, prior_dim, patch_size)
        self.queries = nn.Parameter(torch.randn(num_queries, prior_dim) * prior_dim**-0.5)
        self.frame_aligned_attention = Attention(
            query_dim=prior_dim,
            heads=heads,
            dim_head=prior_dim // heads,
            bias=False,
            processor=FrameAlignedAttnProcessor(),
        )

    def forward(self, ref_latent: torch.Tensor, archived_latents: torch.Tensor | None = None) -> torch.Tensor:
        """ref_latent (b, 4, h, w), archived_latents (b, a, 4, h, w) or None -> F_ac (b, a, n, d)."""
        if ref_latent.ndim != 4:
            raise McdmError(f"ref_latent: expected (b, c, h, w), got shape {tuple(ref_latent.shape)}")
        # 1. tokens of the reference frame F_x (b, m, d)
        f_x = self.patchify_reference(ref_latent)
        # 2. tokens of the archived frames F_a (b a, m, d); wo_fa: the reference is the only "archived" frame
        if self.config.use_archived_frames:
            if archived_latents is None or archived_latents.ndim != 5:
                got = None if archived_latents is None else tuple(archived_latents.shape)
                raise McdmError(f"archived_latents: expected (b, a, c, h, w), got {got}")
            if archived_latents.shape[0] != ref_latent.shape[0]:
                raise McdmError("archived_latents: batch differs from ref_latent")
        else:
            archived_latents = ref_latent[:, None]
        num_archived = archived_latents.shape[1]
        f_a = self.patchify_archived(rearrange(archived_latents, "b a c h w -> (b a) c h w"))
        # 3. frame-aligned attention, frame by frame (frames folded into the batch)
        queries = repeat(self.queries, "n d -> ba n d", ba=f_a.shape[0])
        keys_source = repeat(f_x, "b m d -> (b a) m d", a=num_archived)
        f_ac = self.frame_aligned_attention(queries, encoder_hidden_states=keys_source, value_states=f_a)
        return rearrange(f_ac, "(b a) n d -> b a n d", a=num_archived)
