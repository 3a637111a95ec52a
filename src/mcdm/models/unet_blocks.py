"""The blocks of the MCDM UNet (:mod:`mcdm.models.unet`): the four-attention transformer block, the
spatio-temporal transformer that folds video for it, and SD-1.5-shaped down / mid / up blocks with
the key names of ``UNet2DConditionModel``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from einops import rearrange

from mcdm.errors import McdmError

# Parameters that SD does not have: they start as identity (zero-initialised output projections).
NEW_LAYER_MARKERS = (".attn_present.", ".attn_temporal.")


MemoryState = dict[str, torch.Tensor]


@dataclass
class VideoConditioning:
    """What the transformer blocks read besides the hidden states (frames folded into the batch)."""

    num_frames: int
    archived_tokens: torch.Tensor | Sequence[torch.Tensor] | None  # (b f, N, d), or one per resolution level
    present_tokens: torch.Tensor | None  # (b f, k, d_present) or None (present attention skipped)
    memory_in: MemoryState = field(default_factory=dict)  # block name -> (b s, c)
    memory_out: MemoryState = field(default_factory=dict)

    def archived_for(self, level: int) -> torch.Tensor | None:
        if self.archived_tokens is None or isinstance(self.archived_tokens, torch.Tensor):
            return self.archived_tokens
        return self.archived_tokens[level]


def _zero_output(attn: Attention) -> None:
    nn.init.zeros_(attn.to_out[0].weight)
    if attn.to_out[0].bias is not None:
        nn.init.zeros_(attn.to_out[0].bias)


class MCDMTransformerBlock(nn.Module):
    """SD's BasicTransformerBlock (layer norm, GEGLU) with the four MCDM attentions.

    ``archived_dim=None`` gives a self-attention-only block (the b2 reference UNet's down path).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        archived_dim: int | None,
        present_dim: int | None,
        temporal: bool,
        level: int,
        norm_eps: float = 1e-5,
        attention_bias: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        self.level = level  # resolution level, picks per-level archived tokens (b2)
        self.memory_key = ""  # set by the UNet to this block's module name
        head_dim = dim // heads
        attn_kwargs = dict(query_dim=dim, heads=heads, dim_head=head_dim, bias=attention_bias,
                           upcast_attention=upcast_attention)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(**attn_kwargs)
        self.norm2 = self.attn_archived = self.attn_present = self.attn_temporal = None
        if archived_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn_archived = Attention(cross_attention_dim=archived_dim, **attn_kwargs)
            if present_dim is not None:
                self.attn_present = Attention(cross_attention_dim=present_dim, **attn_kwargs)
                _zero_output(self.attn_present)
        if temporal:
            if archived_dim is None:
                raise McdmError("temporal attention needs the archived-clip reference attention")
            self.attn_temporal = Attention(**attn_kwargs)
            _zero_output(self.attn_temporal)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(
        self,
        hidden_states: torch.Tensor,
        archived_tokens: torch.Tensor | None,
        present_tokens: torch.Tensor | None,
        memory: torch.Tensor | None,
        num_frames: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (b f, s, c) -> (b f, s, c), new memory (b s, c) or None."""
        # 1. self-attention (per frame)
        h = hidden_states + self.attn1(self.norm1(hidden_states))
        new_memory = None
        if self.attn_archived is not None:
            # 2-3. archived-clip and present-clip reference attentions, in parallel on the same stream
            normed = self.norm2(h)
            archived_residual = self.attn_archived(normed, encoder_hidden_states=archived_tokens)  # F_ac^ref - h
            present_residual = None
            if self.attn_present is not None and present_tokens is not None:
                present_residual = self.attn_present(normed, encoder_hidden_states=present_tokens)  # F_pc^ref - h
            update = archived_residual if present_residual is None else archived_residual + present_residual
            # 4. temporal attention along frames: MTA (memory + fast attention) or softmax, by processor
            if self.attn_temporal is not None:
                temporal_delta, new_memory = self.attn_temporal(
                    h,
                    archived_residual=archived_residual,
                    present_residual=present_residual,
                    memory=memory,
                    num_frames=num_frames,
                )
                update = update + temporal_delta
            h = h + update
        # 5. feed-forward
        h = h + self.ff(self.norm3(h))
        return h, new_memory


class SpatioTemporalTransformer(nn.Module):
    """``Transformer2DModel``'s continuous-input path (same keys) around ``MCDMTransformerBlock``s."""

    def __init__(self, channels: int, heads: int, layers: int, norm_groups: int, use_linear_projection: bool,
                 block_kwargs: dict):
        super().__init__()
        self.use_linear_projection = use_linear_projection
        self.gradient_checkpointing = False
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
            self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [MCDMTransformerBlock(channels, heads, **block_kwargs) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, cond: VideoConditioning) -> torch.Tensor:
        height, width = x.shape[-2:]
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(rearrange(x, "n c h w -> n (h w) c"))
        else:
            x = rearrange(self.proj_in(x), "n c h w -> n (h w) c")
        for block in self.transformer_blocks:
            args = (x, cond.archived_for(block.level), cond.present_tokens,
                    cond.memory_in.get(block.memory_key), cond.num_frames)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x, memory = self._gradient_checkpointing_func(block, *args)
            else:
                x, memory = block(*args)
            if memory is not None:
                cond.memory_out[block.memory_key] = memory
        if self.use_linear_projection:
            x = rearrange(self.proj_out(x), "n (h w) c -> n c h w", h=height, w=width)
        else:
            x = self.proj_out(rearrange(x, "n (h w) c -> n c h w", h=height, w=width))
        return x + residual


class _ResnetStack(nn.Module):
    """Shared resnet call with optional gradient checkpointing."""

    gradient_checkpointing = False

    def _resnet(self, resnet: ResnetBlock2D, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(resnet, x, temb)
        return resnet(x, temb)


def _resnet(in_ch: int, out_ch: int, temb: int | None, groups: int, eps: float) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=temb, eps=eps, groups=groups,
                         dropout=0.0, time_embedding_norm="default", non_linearity="silu",
                         output_scale_factor=1.0, pre_norm=True)


class DownBlock(_ResnetStack):
    """``CrossAttnDownBlock2D`` (with_attention) or ``DownBlock2D``: same keys."""

    def __init__(self, in_ch: int, out_ch: int, temb: int, layers: int, add_downsample: bool,
                 with_attention: bool, heads: int, transformer_layers: int, norm_groups: int, norm_eps: float,
                 use_linear_projection: bool, downsample_padding: int, block_kwargs: dict):
        super().__init__()
        self.gradient_checkpointing = False
        self.resnets = nn.ModuleList(
            [_resnet(in_ch if i == 0 else out_ch, out_ch, temb, norm_groups, norm_eps) for i in range(layers)]
        )
        self.attentions = None
        if with_attention:
            self.attentions = nn.ModuleList(
                [SpatioTemporalTransformer(out_ch, heads, transformer_layers, norm_groups, use_linear_projection,
                                           block_kwargs) for _ in range(layers)]
            )
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList(
                [Downsample2D(out_ch, use_conv=True, out_channels=out_ch, padding=downsample_padding, name="op")]
            )

    def forward(self, x, temb, cond):
        skips = ()
        for i, resnet in enumerate(self.resnets):
            x = self._resnet(resnet, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, cond)
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class MidBlock(_ResnetStack):
    """``UNetMidBlock2DCrossAttn``: resnet, (transformer, resnet) x 1."""

    def __init__(self, ch: int, temb: int, heads: int, transformer_layers: int, norm_groups: int, norm_eps: float,
                 use_linear_projection: bool, block_kwargs: dict):
        super().__init__()
        self.gradient_checkpointing = False
        self.resnets = nn.ModuleList([_resnet(ch, ch, temb, norm_groups, norm_eps) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [SpatioTemporalTransformer(ch, heads, transformer_layers, norm_groups, use_linear_projection,
                                       block_kwargs)]
        )

    def forward(self, x, temb, cond):
        x = self._resnet(self.resnets[0], x, temb)
        x = self.attentions[0](x, cond)
        return self._resnet(self.resnets[1], x, temb)


class UpBlock(_ResnetStack):
    """``CrossAttnUpBlock2D`` (with_attention) or ``UpBlock2D``: same keys."""

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, temb: int, layers: int, add_upsample: bool,
                 with_attention: bool, heads: int, transformer_layers: int, norm_groups: int, norm_eps: float,
                 use_linear_projection: bool, block_kwargs: dict):
        super().__init__()
        self.gradient_checkpointing = False
        resnets = []
        for i in range(layers):
            skip_ch = in_ch if i == layers - 1 else out_ch
            resnet_in = prev_ch if i == 0 else out_ch
            resnets.append(_resnet(resnet_in + skip_ch, out_ch, temb, norm_groups, norm_eps))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = None
        if with_attention:
            self.attentions = nn.ModuleList(
                [SpatioTemporalTransformer(out_ch, heads, transformer_layers, norm_groups, use_linear_projection,
                                           block_kwargs) for _ in range(layers)]
            )
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch, use_conv=True, out_channels=out_ch)])

    def forward(self, x, skips, temb, cond, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips[-1]], dim=1)
            skips = skips[:-1]
            x = self._resnet(resnet, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, cond)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


def per_block(value: int | Sequence[int], n: int, name: str) -> list[int]:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n:
        raise McdmError(f"{name}: needs one value per block ({n}), got {values}")
    return values
