"""The archived-clip priors of the design variants (paper Table 5), in place of frame-aligned attention:

- ``QFormerPrior`` (b1): a BLIP-2-style Q-Former whose queries attend to the reference and all a
  archived frames' tokens together;
- ``ReferenceUNetPrior`` (b2): a reference UNet on the reference latent alone (no archived-clip
  information), whose multi-scale features are the tokens.

:class:`~mcdm.models.denoiser.MCDMDenoiser` picks the prior of its ``model_variant``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat

from mcdm.errors import McdmError
from mcdm.models.archived_prior import Patchify, sincos_1d
from mcdm.models.unet import MCDMUNet
from mcdm.models.unet_blocks import DownBlock, VideoConditioning, per_block


class QFormerPrior(ModelMixin, ConfigMixin):
    """b1: BLIP-2-style Q-Former in place of frame-aligned attention.

    a * n learnable queries; each layer = self-attention among the queries, cross-attention to the
    reference and ALL archived tokens jointly (frame index embedded), feed-forward. Output reshaped to
    F_ac (b, a, n, d) so the UNet sees the same token budget as the full model.
    """

    @register_to_config
    def __init__(self, latent_channels: int = 4, prior_dim: int = 64, patch_size: int = 2, num_queries: int = 4,
                 archived_frames: int = 4, num_layers: int = 2, heads: int = 4):
        super().__init__()
        if prior_dim % heads:
            raise McdmError(f"prior_dim {prior_dim} is not divisible by qformer heads {heads}")
        self.patchify_reference = Patchify(latent_channels, prior_dim, patch_size)
        self.patchify_archived = Patchify(latent_channels, prior_dim, patch_size)
        self.queries = nn.Parameter(torch.randn(archived_frames * num_queries, prior_dim) * prior_dim**-0.5)
        self.layers = nn.ModuleList([
            BasicTransformerBlock(prior_dim, heads, prior_dim // heads, cross_attention_dim=prior_dim,
                                  activation_fn="gelu")
            for _ in range(num_layers)
        ])
        self.norm_out = nn.LayerNorm(prior_dim)

    def forward(self, ref_latent: torch.Tensor, archived_latents: torch.Tensor) -> torch.Tensor:
        """ref_latent (b, 4, h, w), archived_latents (b, a, 4, h, w) -> F_ac (b, a, n, d)."""
        a = self.config.archived_frames
        if archived_latents is None or archived_latents.ndim != 5 or archived_latents.shape[1] != a:
            got = None if archived_latents is None else tuple(archived_latents.shape)
            raise McdmError(f"archived_latents: b1 expects (b, a={a}, c, h, w), got {got}")
        batch = ref_latent.shape[0]
        # 1. tokens: reference (frame 0) and archived frames 1..a, each with its frame index embedded
        frames = torch.cat([ref_latent[:, None], archived_latents], dim=1)  # (b, 1+a, c, h, w)
        ref_tokens = self.patchify_reference(frames[:, 0])
        arch_tokens = self.patchify_archived(rearrange(frames[:, 1:], "b a c h w -> (b a) c h w"))
        tokens = torch.cat([ref_tokens[:, None], rearrange(arch_tokens, "(b a) m d -> b a m d", a=a)], dim=1)
        tokens = tokens + sincos_1d(a + 1, tokens.shape[-1], tokens)[None, :, None]
        tokens = rearrange(tokens, "b a m d -> b (a m) d")
        # 2. queries: self-attention, cross-attention to all tokens jointly, feed-forward
        q = repeat(self.queries, "q d -> b q d", b=batch)
        for layer in self.layers:
            q = layer(q, encoder_hidden_states=tokens)
        return rearrange(self.norm_out(q), "b (a n) d -> b a n d", a=a)


class ReferenceUNetPrior(ModelMixin, ConfigMixin):
    """b2: a reference UNet (the denoiser's down path: conv_in, resnets, self-attention transformers) run on
    the reference latent at t = 0, as in AnimateAnyone / Hallo. Its features at each resolution level,
    projected to ``prior_dim``, are the tokens of the archived-clip reference attention at that level.
    No archived frames are used.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        num_attention_heads: int | tuple[int, ...] = 8,
        transformer_layers_per_block: int = 1,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        use_linear_projection: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        downsample_padding: int = 1,
        prior_dim: int = 64,
    ):
        super().__init__()
        n = len(block_out_channels)
        heads = per_block(num_attention_heads, n, "num_attention_heads")
        temb_ch = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], temb_ch, act_fn="silu")
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(DownBlock(
                in_ch, out_ch, temb_ch, layers_per_block, add_downsample=i < n - 1,
                with_attention=block_type == "CrossAttnDownBlock2D", heads=heads[i],
                transformer_layers=transformer_layers_per_block, norm_groups=norm_num_groups, norm_eps=norm_eps,
                use_linear_projection=use_linear_projection, downsample_padding=downsample_padding,
                block_kwargs=dict(archived_dim=None, present_dim=None, temporal=False, level=i)))
        self.level_proj = nn.ModuleList([nn.Linear(ch, prior_dim) for ch in block_out_channels])

    def load_down_path(self, unet: MCDMUNet) -> None:
        """Initialise from the denoiser's down path (every key of this model must exist there)."""
        source = unet.state_dict()
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("level_proj.")}
        for key, value in own.items():
            if key not in source or source[key].shape != value.shape:
                raise McdmError(f"reference UNet: {key} has no matching weight in the denoiser UNet")
        self.load_state_dict({k: source[k] for k in own}, strict=False)

    def forward(self, ref_latent: torch.Tensor) -> list[torch.Tensor]:
        """ref_latent (b, 4, h, w) -> one token tensor (b, h_l * w_l, prior_dim) per resolution level."""
        batch = ref_latent.shape[0]
        temb = self.time_embedding(self.time_proj(torch.zeros(batch, device=ref_latent.device)).to(ref_latent.dtype))
        cond = VideoConditioning(num_frames=1, archived_tokens=None, present_tokens=None)
        x = self.conv_in(ref_latent)
        levels = []
        for block, proj in zip(self.down_blocks, self.level_proj):
            x, skips = block(x, temb, cond)
            feature = skips[len(block.resnets) - 1]  # before downsampling
            levels.append(proj(rearrange(feature, "b c h w -> b (h w) c")))
        return levels


# --------------------------------------------------------------------------------------------------
# builder from the params schema
# --------------------------------------------------------------------------------------------------


