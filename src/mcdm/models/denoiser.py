"""The assembled MCDM denoiser and its variants (paper Tables 4-5), selected by the ``variant`` param.

| variant | archived-clip prior                         | present-clip attention reads | temporal attention |
|---------|---------------------------------------------|------------------------------|--------------------|
| full    | frame-aligned attention over a frames       | F_pc (present-clip prior)    | MTA (memory)       |
| wo_fa   | frame-aligned attention, reference only     | F_pc                         | MTA                |
| wo_fpc  | frame-aligned attention                     | audio features (wav2vec2)    | MTA                |
| wo_mta  | frame-aligned attention                     | F_pc                         | softmax, no memory |
| b1      | Q-Former (BLIP-2 style) over all a frames   | F_pc                         | MTA                |
| b2      | reference UNet on the reference latent      | F_pc                         | MTA                |

``MCDMDenoiser`` owns the UNet and the archived-clip prior of its variant; ``build_denoiser(params)``
(:mod:`mcdm.train.builders`) builds it from the params schema. ``freeze_for_stage(stage)`` sets what each training stage trains
(decisions.md #4).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from mcdm.errors import McdmError
from mcdm.models.archived_prior import ArchivedClipPrior
from mcdm.models.unet import MCDMUNet, MCDMUNetOutput
from mcdm.models.unet_blocks import MemoryState
from mcdm.models.variants import QFormerPrior, ReferenceUNetPrior

# What each training stage trains (decisions.md #4), as parameter groups of ``MCDMDenoiser.parameter_group``.
STAGE_GROUPS: dict[int, tuple[str, ...]] = {
    1: ("archived_prior", "archived_attention", "spatial"),
    2: (),  # stage 2 trains the present-clip motion prior (its own model); the denoiser is frozen
    3: ("present_attention", "temporal_attention"),
}


class MCDMDenoiser(ModelMixin, ConfigMixin):
    """MCDM's video denoiser: archived-clip prior (of the variant) + the four-attention UNet.

    Config (besides the UNet structure, see ``MCDMUNet``): ``model_variant`` (full, wo_fa, wo_fpc,
    wo_mta, b1, b2), ``alpha`` (Eq. 5), ``prior_dim`` d, ``archived_frames`` a, ``num_queries`` n,
    ``patch_size``, ``frame_attention_heads``, ``qformer_layers`` / ``qformer_heads`` (b1),
    ``audio_dim`` (wo_fpc's audio features), ``mta_features`` / ``mta_seed`` (FAVOR+),
    ``prior_positions`` / ``prior_output_norm`` (set by ``warm_start_archived_prior``).
    """

    _supports_gradient_checkpointing = True
    VARIANTS = ("full", "wo_fa", "wo_fpc", "wo_mta", "b1", "b2")  # what this class implements (params: config.VARIANTS)

    @register_to_config
    def __init__(
        self,
        model_variant: str = "full",
        alpha: float = 0.1,
        latent_channels: int = 4,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
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
        archived_frames: int = 4,
        num_queries: int = 4,
        patch_size: int = 2,
        frame_attention_heads: int = 1,
        qformer_layers: int = 2,
        qformer_heads: int = 4,
        audio_dim: int = 80,
        mta_features: int = 32,
        mta_seed: int = 0,
        prior_positions: int = 0,
        prior_output_norm: bool = False,
    ):
        super().__init__()
        if model_variant not in self.VARIANTS:
            raise McdmError(f"variant: unknown {model_variant!r} (choose from {', '.join(self.VARIANTS)})")
        structure = dict(
            down_block_types=tuple(down_block_types), block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, num_attention_heads=num_attention_heads,
            transformer_layers_per_block=transformer_layers_per_block, norm_num_groups=norm_num_groups,
            norm_eps=norm_eps, use_linear_projection=use_linear_projection, flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift, downsample_padding=downsample_padding,
        )
        # 1. the UNet: the present-clip attention reads audio features for wo_fpc; wo_mta uses softmax
        self.unet = MCDMUNet(
            in_channels=latent_channels, out_channels=latent_channels, up_block_types=tuple(up_block_types),
            cross_attention_dim=prior_dim,
            present_attention_dim=audio_dim if model_variant == "wo_fpc" else prior_dim,
            temporal_attention="softmax" if model_variant == "wo_mta" else "mta",
            alpha=alpha, mta_features=mta_features, mta_seed=mta_seed, **structure,
        )
        # 2. the archived-clip prior of the variant
        if model_variant == "b1":
            self.archived_prior = QFormerPrior(latent_channels, prior_dim, patch_size, num_queries, archived_frames,
                                               qformer_layers, qformer_heads)
        elif model_variant == "b2":
            self.archived_prior = ReferenceUNetPrior(in_channels=latent_channels, prior_dim=prior_dim, **structure)
            self.archived_prior.load_down_path(self.unet)
        else:
            self.archived_prior = ArchivedClipPrior(latent_channels, prior_dim, patch_size, num_queries,
                                                    frame_attention_heads,
                                                    use_archived_frames=model_variant != "wo_fa",
                                                    num_positions=prior_positions, output_norm=prior_output_norm)

    def warm_start_archived_prior(self, ref_tokens, side: int) -> None:
        """Start the archived-clip prior from the base model's reference tokens
        (:meth:`ArchivedClipPrior.warm_start`): at the first clip the UNet then reads what the base UNet
        was pretrained on. b1 and b2 have other priors and are refused."""
        if not isinstance(self.archived_prior, ArchivedClipPrior):
            raise McdmError(f"variant {self.config.model_variant}: its archived prior "
                            f"({type(self.archived_prior).__name__}) has no reference-token warm start")
        self.archived_prior.warm_start(ref_tokens, side)
        self.register_to_config(prior_positions=self.archived_prior.config.num_positions, prior_output_norm=True)

    # ---------------------------------------------------------------------------------------------
    # construction from SD weights
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def from_unet2d(cls, unet, **config) -> "MCDMDenoiser":
        """A denoiser whose UNet holds an SD-shaped ``UNet2DConditionModel``'s weights (attn2 -> archived
        reference attention; new attentions zero-initialised). b2's reference UNet starts as a copy of
        the same down path. ``config`` gives the MCDM options; the structure comes from ``unet.config``.
        """
        structure = MCDMUNet.config_from_unet2d(unet.config)
        if structure["in_channels"] != structure["out_channels"]:
            raise McdmError("from_unet2d: source UNet's in_channels and out_channels differ")
        prior_dim = config.pop("prior_dim", structure["cross_attention_dim"])
        if prior_dim != structure["cross_attention_dim"]:
            raise McdmError(f"model.prior_dim {prior_dim} must equal the source UNet's cross_attention_dim "
                            f"{structure['cross_attention_dim']} (its attn2 becomes the archived-clip attention)")
        latent_channels = structure.pop("in_channels")
        structure.pop("out_channels")
        structure.pop("cross_attention_dim")
        for key, value in config.items():
            if key in structure and _as_tuple(value) != _as_tuple(structure[key]):
                raise McdmError(f"from_unet2d: {key}={value!r} differs from the source UNet's {structure[key]!r}")
        model = cls(**{**config, **structure, "latent_channels": latent_channels, "prior_dim": prior_dim})
        model.unet.load_unet2d_state_dict(unet.state_dict())
        if isinstance(model.archived_prior, ReferenceUNetPrior):
            model.archived_prior.load_down_path(model.unet)
        return model

    # ---------------------------------------------------------------------------------------------
    # training stages (decisions.md #4)
    # ---------------------------------------------------------------------------------------------

    @staticmethod
    def parameter_group(name: str) -> str:
        """``archived_prior``, ``archived_attention``, ``spatial``, ``present_attention`` or ``temporal_attention``."""
        if name.startswith("archived_prior."):
            return "archived_prior"
        if name.startswith("unet."):
            return MCDMUNet.parameter_group(name)
        raise McdmError(f"parameter {name} belongs to no group")

    def trainable_parameter_names(self, stage: int) -> list[str]:
        if stage not in STAGE_GROUPS:
            raise McdmError(f"stage: must be 1, 2 or 3 (got {stage})")
        groups = STAGE_GROUPS[stage]
        return [name for name, _ in self.named_parameters() if self.parameter_group(name) in groups]

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """Parameters trained in ``stage``: 1 = archived prior + archived attention + UNet spatial layers;
        2 = none (the present-clip prior is trained instead); 3 = present-clip attention + MTA."""
        names = set(self.trainable_parameter_names(stage))
        return [p for name, p in self.named_parameters() if name in names]

    def freeze_for_stage(self, stage: int) -> list[nn.Parameter]:
        """Set ``requires_grad`` for ``stage`` (everything else frozen); returns the trainable parameters."""
        names = set(self.trainable_parameter_names(stage))
        for name, param in self.named_parameters():
            param.requires_grad_(name in names)
        return [p for name, p in self.named_parameters() if name in names]

    def set_alpha(self, alpha: float) -> None:
        """Change Eq. 5's alpha (MTA processor and saved config); weights are untouched."""
        self.unet.set_alpha(alpha)
        self.register_to_config(alpha=float(alpha))

    # ---------------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------------

    def encode_archived(
        self, ref_latent: torch.Tensor, archived_latents: torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """The archived-clip tokens the UNet reads: F_ac flattened to (B, a * n, d); b2: per-level list.

        Independent of the timestep: a sampler computes it once per clip and passes ``archived_tokens``.
        """
        variant = self.config.model_variant
        if variant == "b2":
            return self.archived_prior(ref_latent)
        if variant == "wo_fa":
            f_ac = self.archived_prior(ref_latent, None)
        else:
            if archived_latents is not None and archived_latents.ndim == 5 \
                    and archived_latents.shape[1] != self.config.archived_frames:
                raise McdmError(f"archived_latents: expected a={self.config.archived_frames} archived frames, "
                                f"got {archived_latents.shape[1]}")
            f_ac = self.archived_prior(ref_latent, archived_latents)
        return rearrange(f_ac, "b a n d -> b (a n) d")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        ref_latent: torch.Tensor | None = None,
        archived_latents: torch.Tensor | None = None,
        present_tokens: torch.Tensor | None = None,
        audio_tokens: torch.Tensor | None = None,
        memory_state: MemoryState | None = None,
        landmark_features: torch.Tensor | None = None,
        archived_tokens: torch.Tensor | Sequence[torch.Tensor] | None = None,
        return_dict: bool = True,
    ) -> MCDMUNetOutput | tuple:
        """Predict the noise of one clip.

        Args:
            sample: noisy latents (B, 4, F, h, w).
            timestep: scalar or (B,).
            ref_latent: frozen-VAE latent of the reference frame (B, 4, h, w).
            archived_latents: frozen-VAE latents of the archived frames (B, a, 4, h, w); ignored by
                wo_fa and b2 (no archived-clip information).
            present_tokens: present-clip prior tokens F_pc (B, F, n_pc, prior_dim); None skips the
                present-clip attention (stage 1). Not used by wo_fpc.
            audio_tokens: wo_fpc only: per-frame audio windows (B, F, k, audio_dim).
            memory_state: MTA memory returned for the previous clip (None for the first clip).
            landmark_features: landmark guider output (B, block_out_channels[0], F, h, w), added after conv_in.
            archived_tokens: precomputed ``encode_archived(...)`` (then ref/archived latents are not needed).
        Returns:
            MCDMUNetOutput(sample: predicted noise (B, 4, F, h, w), memory_state: block -> (B, h_l*w_l, C)
            to pass with the next clip; None for wo_mta).
        """
        # 1. archived-clip motion prior F_ac (independent of the timestep)
        if archived_tokens is None:
            if ref_latent is None:
                raise McdmError("ref_latent: required (or pass precomputed archived_tokens)")
            archived_tokens = self.encode_archived(ref_latent, archived_latents)
        # 2. what the present-clip attention reads: F_pc, or audio features for wo_fpc
        if self.config.model_variant == "wo_fpc":
            if present_tokens is not None:
                raise McdmError("present_tokens: variant wo_fpc has no present-clip prior; pass audio_tokens")
            conditioning = audio_tokens
        else:
            if audio_tokens is not None:
                raise McdmError(f"audio_tokens: only variant wo_fpc reads audio (this is {self.config.model_variant})")
            conditioning = present_tokens
        # 3. denoising UNet
        return self.unet(sample, timestep, archived_tokens, conditioning, memory_state=memory_state,
                         conv_in_residual=landmark_features, return_dict=return_dict)


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
