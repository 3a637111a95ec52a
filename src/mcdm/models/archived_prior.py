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

Warm start from the base model's reference tokens (``ArchivedClipPrior.warm_start``): the UNet's
archived-clip attention is the base UNet's cross-attention, pretrained on
``ReferenceTokens(z) = LayerNorm(Conv(z) + E_pos)`` (m tokens of one frame). With n = m queries, each
query j set to pick position j of the keys, W_V = W_O = I, the archived patchify given the base
conv and positions, and a LayerNorm on the output, F_ac[i] = ReferenceTokens(f_a^i) up to the
softmax's leak onto other positions. Attention over a copies of the same m tokens equals attention
over the m tokens, so at the first clip (every archived frame = the reference) the MCDM UNet reads
exactly what the base UNet was trained to read; stage 1 starts from a model that already keeps the
reference's appearance instead of from random queries. This adds two things to Eq. 1-2, both off
for a randomly initialised prior: a learnable position table per patchify (zero = the fixed sine-
cosine positions alone) and the output LayerNorm.
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

# logit margin of a warm-started query on its own row and column (ArchivedClipPrior.warm_start)
WARM_START_LOGIT_GAP = 8.0


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

    def __init__(self, in_channels: int, dim: int, patch_size: int, num_positions: int = 0):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        # learnable offsets on top of the fixed positions (warm start only; 0 = fixed positions alone)
        self.pos_embed = nn.Parameter(torch.zeros(num_positions, dim)) if num_positions else None

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h, w = latent.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise McdmError(f"patchify: latent side {h}x{w} is not a multiple of patch_size {self.patch_size}")
        x = self.proj(latent)
        tokens = rearrange(x, "n d h w -> n (h w) d")
        tokens = tokens + sincos_2d(x.shape[-2], x.shape[-1], x.shape[1], tokens)
        if self.pos_embed is not None:
            if self.pos_embed.shape[0] != tokens.shape[1]:
                raise McdmError(f"patchify: {tokens.shape[1]} tokens per frame ({h}x{w} latent, patch {self.patch_size}) "
                                f"but the learned positions were made for {self.pos_embed.shape[0]}")
            tokens = tokens + self.pos_embed
        return tokens


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
        num_positions: m for learnable position offsets in both patchify layers (0: fixed only).
        output_norm: LayerNorm on F_ac (the base reference tokens' normalisation).
        ``warm_start`` sets the last two.
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
        num_positions: int = 0,
        output_norm: bool = False,
    ):
        super().__init__()
        if prior_dim % heads:
            raise McdmError(f"prior_dim {prior_dim} is not divisible by heads {heads}")
        self.patchify_reference = Patchify(latent_channels, prior_dim, patch_size, num_positions)
        self.patchify_archived = Patchify(latent_channels, prior_dim, patch_size, num_positions)
        self.queries = nn.Parameter(torch.randn(num_queries, prior_dim) * prior_dim**-0.5)
        self.frame_aligned_attention = Attention(
            query_dim=prior_dim,
            heads=heads,
            dim_head=prior_dim // heads,
            bias=False,
            processor=FrameAlignedAttnProcessor(),
        )
        self.norm_out = nn.LayerNorm(prior_dim) if output_norm else None

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
        if self.norm_out is not None:
            f_ac = self.norm_out(f_ac)
        return rearrange(f_ac, "(b a) n d -> b a n d", a=num_archived)

    @torch.no_grad()
    def warm_start(self, ref_tokens, side: int, logit_gap: float = WARM_START_LOGIT_GAP) -> None:
        """Set the weights so that F_ac[i] = ``ref_tokens(f_a^i)`` (module docstring); ``ref_tokens`` is
        the base model's :class:`~mcdm.models.reference_tokens.ReferenceTokens` and ``side`` the latent side.

        Query j puts logit ``logit_gap`` on keys of its row and again on keys of its column (the 2-D
        sine-cosine keys separate rows from columns, not single positions), so its weight on position j
        is ``(1 + (side/p - 1) exp(-gap))^-2`` (0.998 at side/p = 4, gap 8). Refuses a prior whose shapes cannot match.
        """
        cfg, rc = self.config, ref_tokens.config
        grid = side // cfg.patch_size
        m = grid * grid
        problems = []
        if cfg.heads != 1:
            problems.append(f"frame_attention_heads {cfg.heads} (needs 1)")
        if cfg.num_queries != m:
            problems.append(f"num_queries {cfg.num_queries} vs {m} reference tokens per frame")
        if (rc.dim, rc.patch_size, rc.latent_channels, rc.sample_size) != (cfg.prior_dim, cfg.patch_size,
                                                                           cfg.latent_channels, side):
            problems.append(f"reference tokens (dim {rc.dim}, patch {rc.patch_size}, {rc.latent_channels} channels, "
                            f"side {rc.sample_size}) vs prior (dim {cfg.prior_dim}, patch {cfg.patch_size}, "
                            f"{cfg.latent_channels} channels, side {side})")
        if problems:
            raise McdmError("archived prior warm start from the base reference tokens impossible: " + "; ".join(problems)
                            + " (set model.archived_prior_init: random, or match the shapes)")
        d = cfg.prior_dim
        like = self.queries
        if cfg.num_positions != m or self.norm_out is None:
            for patchify in (self.patchify_reference, self.patchify_archived):
                patchify.pos_embed = nn.Parameter(torch.zeros(m, d, device=like.device, dtype=like.dtype))
            self.norm_out = nn.LayerNorm(d).to(like.device, like.dtype)
            self.register_to_config(num_positions=m, output_norm=True)
        fixed = sincos_2d(grid, grid, d, like).double()  # (m, d): the keys, since the reference conv starts at 0
        # keys K = F_x = sincos (reference conv zeroed, W_K = I); queries Q with Q K^T / sqrt(d) = gap * (same row + same col)
        rows = torch.arange(m, device=like.device) // grid
        cols = torch.arange(m, device=like.device) % grid
        target = logit_gap * ((rows[:, None] == rows[None]).double() + (cols[:, None] == cols[None]).double())
        # the keys span only 2 side/p - 1 dimensions (row and column parts): the minimum-norm exact solution
        queries = (torch.linalg.pinv(fixed) @ (target * d**0.5)).T  # (m, d): Q fixed^T = target sqrt(d)
        attn = self.frame_aligned_attention
        eye = torch.eye(d, device=like.device, dtype=like.dtype)
        self.queries.copy_(queries.to(like.dtype))
        for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            linear.weight.copy_(eye)
        if attn.to_out[0].bias is not None:
            attn.to_out[0].bias.zero_()
        self.patchify_reference.proj.weight.zero_()
        self.patchify_reference.proj.bias.zero_()
        self.patchify_reference.pos_embed.zero_()
        # values: V = Conv_base(f_a) + E_pos_base (the fixed positions cancelled), then the base LayerNorm
        self.patchify_archived.proj.load_state_dict(ref_tokens.patchify.state_dict())
        self.patchify_archived.pos_embed.copy_(ref_tokens.pos_embed[0] - fixed.to(like.dtype))
        self.norm_out.load_state_dict(ref_tokens.norm.state_dict())
