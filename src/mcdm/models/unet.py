"""The MCDM denoising UNet: SD-1.5-shaped, each transformer block holding four attentions (paper Fig. 1).

Built from diffusers blocks (``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, ``Attention``,
``FeedForward``, ``Timesteps``) with the key names of ``UNet2DConditionModel``, so SD-1.5 weights load
through ``from_unet2d`` by a key map (decisions.md #5):

    SD-1.5 transformer block            MCDM transformer block
    norm1, attn1  (self-attention)   -> norm1, attn1            1. self-attention
    norm2, attn2  (text cross-attn)  -> norm2, attn_archived    2. archived-clip reference attention (-> F_ac)
                                        attn_present  (new)     3. present-clip reference attention (-> F_pc),
                                                                   in parallel with 2 (wo_fpc: audio features)
                                        attn_temporal (new)     4. temporal attention (MTA or softmax processor)
    norm3, ff                        -> norm3, ff

The new attentions' output projections are zero-initialised, so a freshly loaded SD UNet computes
exactly what the ``UNet2DConditionModel`` computes with the archived tokens as its encoder states.
There is no text cross-attention. Video is ``(B, C, F, H, W)`` at the boundary; spatial layers see
frames folded into the batch ``(b f)``, temporal attention ``(b h w) f c``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange, repeat

from mcdm.errors import McdmError
from mcdm.models.temporal_attention import make_temporal_processor
from mcdm.models.unet_blocks import (
    NEW_LAYER_MARKERS,
    DownBlock,
    MCDMTransformerBlock,
    MemoryState,
    MidBlock,
    UpBlock,
    VideoConditioning,
    per_block,
)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# SD key -> MCDM key (every other key is identical): SD's text cross-attention becomes the
# archived-clip reference attention.
UNET2D_KEY_MAP = ((".attn2.", ".attn_archived."),)


@dataclass
class MCDMUNetOutput(BaseOutput):
    """sample: (B, C, F, H, W); memory_state: block name -> (B, H*W, C) last MTA memory (None for softmax)."""

    sample: torch.Tensor
    memory_state: MemoryState | None = None


class MCDMUNet(ModelMixin, ConfigMixin, AttentionMixin):
    """SD-1.5-shaped video denoising UNet with archived / present reference attentions and MTA.

    Args (UNet2DConditionModel names and meanings where they exist):
        in_channels, out_channels: latent channels (4).
        down_block_types, up_block_types: ``CrossAttnDownBlock2D`` / ``DownBlock2D`` and
            ``CrossAttnUpBlock2D`` / ``UpBlock2D`` (SD-1.5: 3 cross-attention levels + 1 plain).
        block_out_channels, layers_per_block, norm_num_groups, norm_eps, use_linear_projection,
        transformer_layers_per_block, flip_sin_to_cos, freq_shift, downsample_padding: as in SD.
        num_attention_heads: heads per attention (SD-1.5 config calls it ``attention_head_dim``: 8).
        cross_attention_dim: width of the archived-clip tokens F_ac (SD's text width, 768 for SD-1.5).
        present_attention_dim: width of the present-clip tokens F_pc (or audio features for wo_fpc);
            None removes the present-clip attention.
        temporal_attention: ``mta`` (full model) or ``softmax`` (wo_mta); None removes it.
        alpha: Eq. 5 memory update rate; mta_features: FAVOR+ random features; mta_seed: their seed.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        num_attention_heads: int | tuple[int, ...] = 8,
        transformer_layers_per_block: int = 1,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 64,
        present_attention_dim: int | None = 64,
        use_linear_projection: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        downsample_padding: int = 1,
        temporal_attention: str | None = "mta",
        alpha: float = 0.1,
        mta_features: int = 32,
        mta_seed: int = 0,
    ):
        super().__init__()
        n = len(block_out_channels)
        if len(down_block_types) != n or len(up_block_types) != n:
            raise McdmError("down_block_types / up_block_types: need one per block_out_channels entry")
        for t in down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise McdmError(f"down_block_types: unsupported {t!r} (choose from {', '.join(DOWN_BLOCK_TYPES)})")
        for t in up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise McdmError(f"up_block_types: unsupported {t!r} (choose from {', '.join(UP_BLOCK_TYPES)})")
        heads = per_block(num_attention_heads, n, "num_attention_heads")
        temb_ch = block_out_channels[0] * 4

        def block_kwargs(level: int) -> dict:
            return dict(archived_dim=cross_attention_dim, present_dim=present_attention_dim,
                        temporal=temporal_attention is not None, level=level, norm_eps=1e-5)

        # 1. time
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], temb_ch, act_fn="silu")
        # 2. pre-process
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        # 3. down
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(DownBlock(
                in_ch, out_ch, temb_ch, layers_per_block, add_downsample=i < n - 1,
                with_attention=block_type == "CrossAttnDownBlock2D", heads=heads[i],
                transformer_layers=transformer_layers_per_block, norm_groups=norm_num_groups, norm_eps=norm_eps,
                use_linear_projection=use_linear_projection, downsample_padding=downsample_padding,
                block_kwargs=block_kwargs(i)))
        # 4. mid
        self.mid_block = MidBlock(block_out_channels[-1], temb_ch, heads[-1], transformer_layers_per_block,
                                  norm_num_groups, norm_eps, use_linear_projection, block_kwargs(n - 1))
        # 5. up
        self.up_blocks = nn.ModuleList()
        reversed_ch, reversed_heads = list(reversed(block_out_channels)), list(reversed(heads))
        out_ch = reversed_ch[0]
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch = out_ch, reversed_ch[i]
            in_ch = reversed_ch[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(
                in_ch, prev_ch, out_ch, temb_ch, layers_per_block + 1, add_upsample=i < n - 1,
                with_attention=block_type == "CrossAttnUpBlock2D", heads=reversed_heads[i],
                transformer_layers=transformer_layers_per_block, norm_groups=norm_num_groups, norm_eps=norm_eps,
                use_linear_projection=use_linear_projection, block_kwargs=block_kwargs(n - 1 - i)))
        # 6. post-process
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

        for name, module in self.named_modules():
            if isinstance(module, MCDMTransformerBlock):
                module.memory_key = name
        if temporal_attention is not None:
            self.set_temporal_processor(
                make_temporal_processor(temporal_attention, alpha=alpha, num_features=mta_features, seed=mta_seed)
            )

    # ---------------------------------------------------------------------------------------------
    # processors and parameter groups
    # ---------------------------------------------------------------------------------------------

    def transformer_blocks(self) -> list[MCDMTransformerBlock]:
        return [m for m in self.modules() if isinstance(m, MCDMTransformerBlock)]

    def set_temporal_processor(self, processor) -> None:
        """Swap the maths of every temporal attention (``MemoryTemporalAttnProcessor`` / ``Softmax...``)."""
        for block in self.transformer_blocks():
            if block.attn_temporal is not None:
                block.attn_temporal.set_processor(processor)

    def _memory_keys(self) -> set[str]:
        return {b.memory_key for b in self.transformer_blocks() if b.attn_temporal is not None}

    @property
    def temporal_processor(self):
        for block in self.transformer_blocks():
            if block.attn_temporal is not None:
                return block.attn_temporal.processor
        return None

    def set_alpha(self, alpha: float) -> None:
        """Change the Eq. 5 memory rate (the MTA processor and the saved config)."""
        if self.config.temporal_attention == "mta":
            self.set_temporal_processor(make_temporal_processor(
                "mta", alpha=alpha, num_features=self.config.mta_features, seed=self.config.mta_seed))
        self.register_to_config(alpha=float(alpha))

    @staticmethod
    def parameter_group(name: str) -> str:
        """``present_attention``, ``temporal_attention``, ``archived_attention`` or ``spatial``."""
        if ".attn_present." in name:
            return "present_attention"
        if ".attn_temporal." in name:
            return "temporal_attention"
        if ".attn_archived." in name:
            return "archived_attention"
        return "spatial"

    # ---------------------------------------------------------------------------------------------
    # SD weights
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def config_from_unet2d(cls, unet_config) -> dict:
        """The structural part of this model's config read from an ``UNet2DConditionModel`` config."""
        cfg = dict(unet_config)
        unsupported = {
            "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
            "time_cond_proj_dim": None, "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
            "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
            "dual_cross_attention": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "act_fn": "silu",
            "center_input_sample": False, "num_class_embeds": None, "mid_block_scale_factor": 1,
            "dropout": 0.0, "reverse_transformer_layers_per_block": None, "attention_type": "default",
            "upcast_attention": False, "timestep_post_act": None, "time_embedding_act_fn": None,
            "time_embedding_dim": None, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
            "cross_attention_norm": None, "encoder_hid_dim_type": None,
        }
        for key, expected in unsupported.items():
            got = cfg.get(key, expected)
            if isinstance(got, (list, tuple)) and len(set(got)) == 1:
                got = got[0]  # per-block booleans such as only_cross_attention
            if got != expected:
                raise McdmError(f"from_unet2d: source UNet has {key}={got!r}; MCDMUNet supports only {expected!r}")
        layers = cfg.get("transformer_layers_per_block", 1)
        if not isinstance(layers, int):
            if len(set(layers)) != 1:
                raise McdmError(f"from_unet2d: per-block transformer_layers_per_block {layers} is not supported")
            layers = layers[0]
        heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]  # SD-1.5's legacy name
        cross_dim = cfg["cross_attention_dim"]
        if not isinstance(cross_dim, int):
            raise McdmError(f"from_unet2d: per-block cross_attention_dim {cross_dim} is not supported")
        return dict(
            in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
            down_block_types=tuple(cfg["down_block_types"]), up_block_types=tuple(cfg["up_block_types"]),
            block_out_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
            num_attention_heads=heads if isinstance(heads, int) else tuple(heads),
            transformer_layers_per_block=layers, norm_num_groups=cfg["norm_num_groups"],
            norm_eps=cfg["norm_eps"], cross_attention_dim=cross_dim,
            use_linear_projection=cfg.get("use_linear_projection", False),
            flip_sin_to_cos=cfg["flip_sin_to_cos"], freq_shift=cfg["freq_shift"],
            downsample_padding=cfg["downsample_padding"],
        )

    @classmethod
    def from_unet2d(cls, unet, **config) -> "MCDMUNet":
        """An MCDMUNet holding ``unet``'s (an SD-shaped ``UNet2DConditionModel``) weights.

        ``config`` sets the MCDM-only options (present_attention_dim, temporal_attention, alpha, ...).
        The structure (channels, block types, heads, cross_attention_dim) comes from ``unet.config``.
        """
        model = cls(**{**cls.config_from_unet2d(unet.config), **config})
        model.load_unet2d_state_dict(unet.state_dict())
        return model

    def load_unet2d_state_dict(self, source: dict[str, torch.Tensor]) -> list[str]:
        """Copy an SD-shaped UNet state dict by ``UNET2D_KEY_MAP``; returns the keys left at their init.

        Every source key must be used and match in shape; every target key not loaded must be one of the
        new layers (``NEW_LAYER_MARKERS``). Anything else is a one-line McdmError naming the key.
        """
        mapped = map_unet2d_state_dict(source, self.state_dict())
        result = self.load_state_dict(mapped, strict=False)
        if result.unexpected_keys:  # cannot happen after the map's own checks
            raise McdmError(f"from_unet2d: unexpected key {result.unexpected_keys[0]}")
        return list(result.missing_keys)

    # ---------------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        archived_tokens: torch.Tensor | Sequence[torch.Tensor],
        present_tokens: torch.Tensor | None = None,
        memory_state: MemoryState | None = None,
        conv_in_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> MCDMUNetOutput | tuple:
        """Predict the noise of a clip.

        Args:
            sample: noisy latents (B, C, F, H, W).
            timestep: scalar or (B,) diffusion timesteps (one per clip, shared by its frames).
            archived_tokens: F_ac flattened to (B, N, d) (N = a * n), shared by every frame; or a list of
                per-resolution-level tensors (B, N_l, d) (b2's reference UNet features).
            present_tokens: per-frame present-clip tokens F_pc (B, F, k, d_present) (wo_fpc: audio
                features); None skips the present-clip attention (e.g. stage 1, before the prior exists).
            memory_state: the MTA memory returned for the previous clip (block name -> (B, H*W, C)),
                None for the first clip.
            conv_in_residual: optional (B, C0, F, H, W) added after ``conv_in`` (the landmark guider).
        Returns:
            MCDMUNetOutput(sample (B, C, F, H, W), memory_state) (memory_state None without MTA).
        """
        # 0. shapes: frames are folded into the batch for every spatial layer
        if sample.ndim != 5:
            raise McdmError(f"sample: expected (B, C, F, H, W), got shape {tuple(sample.shape)}")
        batch, _, num_frames, height, width = sample.shape
        x = rearrange(sample, "b c f h w -> (b f) c h w")

        # 1. time: one timestep per clip, repeated over its frames
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(batch) if timesteps.numel() == 1 else timesteps
        if timesteps.shape != (batch,):
            raise McdmError(f"timestep: expected a scalar or ({batch},), got shape {tuple(timesteps.shape)}")
        t_emb = self.time_proj(repeat(timesteps, "b -> (b f)", f=num_frames)).to(dtype=x.dtype)
        temb = self.time_embedding(t_emb)

        # 2. conditioning: archived tokens shared by every frame, present tokens per frame
        cond = VideoConditioning(
            num_frames=num_frames,
            archived_tokens=_repeat_archived(archived_tokens, batch, num_frames),
            present_tokens=_fold_present(present_tokens, batch, num_frames),
            memory_in=_fold_memory(memory_state, batch, self._memory_keys()),
        )

        # 3. pre-process (+ landmark guider features)
        x = self.conv_in(x)
        if conv_in_residual is not None:
            if conv_in_residual.shape != (batch, x.shape[1], num_frames, height, width):
                raise McdmError(f"conv_in_residual: expected {(batch, x.shape[1], num_frames, height, width)}, "
                                f"got {tuple(conv_in_residual.shape)}")
            x = x + rearrange(conv_in_residual, "b c f h w -> (b f) c h w")

        # 4. down
        skips = (x,)
        for block in self.down_blocks:
            x, block_skips = block(x, temb, cond)
            skips += block_skips

        # 5. mid
        x = self.mid_block(x, temb, cond)

        # 6. up
        for block in self.up_blocks:
            n_res = len(block.resnets)
            block_skips, skips = skips[-n_res:], skips[:-n_res]
            upsample_size = skips[-1].shape[2:] if skips else None
            x = block(x, block_skips, temb, cond, upsample_size=upsample_size)

        # 7. post-process, frames unfolded
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        out = rearrange(x, "(b f) c h w -> b c f h w", b=batch)
        memory_out = None
        if cond.memory_out:  # MTA: the last memory state of every block, (B, H*W, C)
            memory_out = {k: rearrange(v, "(b s) ... -> b s ...", b=batch) for k, v in cond.memory_out.items()}
        if not return_dict:
            return (out, memory_out)
        return MCDMUNetOutput(sample=out, memory_state=memory_out)


def _repeat_archived(tokens, batch: int, num_frames: int):
    """(B, N, d) -> (B F, N, d): every frame reads the same archived tokens (or per-level list of them)."""
    if tokens is None:
        raise McdmError("archived_tokens: required (the archived-clip prior output F_ac)")
    if not isinstance(tokens, torch.Tensor):
        return [_repeat_archived(t, batch, num_frames) for t in tokens]
    if tokens.ndim != 3 or tokens.shape[0] != batch:
        raise McdmError(f"archived_tokens: expected (B={batch}, N, d), got shape {tuple(tokens.shape)}")
    return repeat(tokens, "b n d -> (b f) n d", f=num_frames)


def _fold_present(tokens: torch.Tensor | None, batch: int, num_frames: int) -> torch.Tensor | None:
    if tokens is None:
        return None
    if tokens.ndim != 4 or tokens.shape[:2] != (batch, num_frames):
        raise McdmError(f"present_tokens: expected (B={batch}, F={num_frames}, k, d), got {tuple(tokens.shape)}")
    return rearrange(tokens, "b f k d -> (b f) k d")


def _fold_memory(memory_state: MemoryState | None, batch: int, keys: set[str]) -> MemoryState:
    if not memory_state:
        return {}
    out = {}
    for name, state in memory_state.items():
        if name not in keys:
            raise McdmError(f"memory_state: {name} is not a temporal-attention block of this UNet")
        if state.ndim < 3 or state.shape[0] != batch:
            raise McdmError(f"memory_state[{name}]: expected (B={batch}, H*W, C), got {tuple(state.shape)}")
        out[name] = rearrange(state, "b s ... -> (b s) ...")
    return out


def map_unet2d_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict:
    """Rename an SD ``UNet2DConditionModel`` state dict to MCDMUNet keys, checking every key and shape.

    Raises McdmError when a source key has no target (so nothing of the source is silently dropped),
    when shapes differ, or when a target key outside the new layers is not covered.
    """
    mapped = {}
    for key, value in source.items():
        new_key = key
        for old, new in UNET2D_KEY_MAP:
            new_key = new_key.replace(old, new)
        if new_key not in target:
            raise McdmError(f"from_unet2d: source key {key} has no place in MCDMUNet (unused source weight)")
        if tuple(target[new_key].shape) != tuple(value.shape):
            raise McdmError(f"from_unet2d: {key} has shape {tuple(value.shape)}, MCDMUNet {new_key} "
                            f"needs {tuple(target[new_key].shape)}")
        mapped[new_key] = value
    for key in target:
        if key not in mapped and not any(marker in key for marker in NEW_LAYER_MARKERS):
            raise McdmError(f"from_unet2d: MCDMUNet key {key} is not in the source UNet")
    return mapped
