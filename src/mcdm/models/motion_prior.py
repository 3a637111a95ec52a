"""Present-clip motion-prior diffusion model (paper Sec. 3.3, Eq. 3; decisions.md #3, #4).

It predicts per-frame motion states -- head, lip and expression tokens (see ``encoders.py``) -- for a
present clip of F frames from the clip's audio and the reference image, optionally guided by landmark
tokens of a driving video. Layout of one denoiser call:

    audio (B, F, A) --window, proj--> a_f ----------+
                                                    FiLM --> c_f  (multimodal correlation tokens)
    ref_embedding (B, E) --proj, repeat over f--> i_f

    sequence = [ t ] + [ c_f, h_f, l_f, e_f  for f = 1..F ]          (B, 1 + 4F, d)
        t    : timestep token;  h_f : noisy head token, or the landmark token when landmarks guide
        l_f, e_f : noisy lip / expression tokens
    L x ( multimodal causal block  -- DiT block with adaLN-Zero on the whole sequence, a token of frame
          f attends to the tokens of frames <= f (and t);
          temporal interaction block -- the same block along time, one sequence per token slot )
    -> eps predictions for the noisy slots

Training (stage 2, Eq. 3): L_prior = E ||eps - eps_theta(z_t, t, F_p)||^2 on the noisy slots, with the
whole landmark clip dropped with probability ``p_drop_landmarks`` (then the head is denoised too).
``present_clip_tokens`` turns (predicted or true) motion tokens into F_pc (B, F, 3, d) for the UNet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import ConfigMixin, DDIMScheduler, DDPMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_timestep_embedding
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange, repeat
from torch import nn

from mcdm.errors import McdmError
from mcdm.face.geometry import HEAD_POSE_DIM
from mcdm.models.motion_encoders import frame_windows

# token slots per frame, in sequence order
SLOT_CORRELATION, SLOT_HEAD, SLOT_LIP, SLOT_EXPRESSION = range(4)
SLOTS_PER_FRAME = 4
TYPE_LANDMARK = 4  # type embedding of a landmark token sitting in the head slot


PRIOR_X0_RANGE = 6.0  # motion tokens are standardised: |x0| > 6 sd is a sampling blow-up, never data


@dataclass
class MotionPriorOutput(BaseOutput):
    """Per-frame motion tensors (B, F, dim): eps predictions from ``forward``, tokens from ``sample``."""

    head: torch.Tensor
    lip: torch.Tensor
    expression: torch.Tensor


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018): FiLM(x | c) = gamma(c) * x + beta(c), with
    gamma(c) = 1 + W_g c + b_g and beta(c) = W_b c + b_b; W and b start at zero, so FiLM starts as identity."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.to_gamma_beta = nn.Linear(cond_dim, 2 * dim)
        nn.init.zeros_(self.to_gamma_beta.weight)
        nn.init.zeros_(self.to_gamma_beta.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        delta_gamma, beta = self.to_gamma_beta(cond).chunk(2, dim=-1)
        return (1.0 + delta_gamma) * x + beta


def frame_causal_mask(frame_index: torch.Tensor) -> torch.Tensor:
    """(N, N) additive attention mask: token i may attend to token j iff frame(j) <= frame(i).
    The timestep token has frame -1: everyone sees it, it sees only itself (so it cannot carry the
    future back to the past across layers)."""
    allowed = frame_index[None, :] <= frame_index[:, None]
    return torch.zeros(allowed.shape, device=frame_index.device).masked_fill(~allowed, float("-inf"))


class AdaLNZeroTransformerBlock(nn.Module):
    """DiT block with adaLN-Zero (Peebles & Xie 2023): shift / scale / gate of both sub-layers regressed
    from the conditioning vector, gates initialised to zero so the block starts as the identity.

        x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)
        x = x + gate_mlp * FF(LN(x) * (1 + scale_mlp) + shift_mlp)
    """

    def __init__(self, dim: int, num_heads: int, ff_mult: int = 4):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)  # adaLN-Zero modulation of both sub-layers from one vector
        nn.init.zeros_(self.norm1.linear.weight)
        nn.init.zeros_(self.norm1.linear.bias)
        self.attn = Attention(query_dim=dim, heads=num_heads, dim_head=dim // num_heads, bias=True, out_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=ff_mult, activation_fn="gelu-approximate")

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: (N, S, d); cond: (N, d); attention_mask: (N, S, S) additive or None
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=cond)
        x = x + gate_msa[:, None] * self.attn(h, attention_mask=attention_mask)
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


class MultimodalCausalBlock(nn.Module):
    """DiT block over the whole multimodal sequence [t, (c_f, h_f, l_f, e_f)_f] under the frame-causal mask."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int = 4):
        super().__init__()
        self.block = AdaLNZeroTransformerBlock(dim, num_heads, ff_mult)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        # x: (B, 1 + K F, d); causal_mask: (S, S) -> one copy per batch item (diffusers' mask layout)
        return self.block(x, cond, causal_mask.expand(x.shape[0], -1, -1))


class TemporalInteractionBlock(nn.Module):
    """DiT block along time: each token slot (correlation, head, lip, expression) is one sequence of F
    frames, so a slot's token sees the same slot in the other frames (all frames, or past ones only
    when ``causal``). The timestep token does not take part."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int = 4, causal: bool = False):
        super().__init__()
        self.block = AdaLNZeroTransformerBlock(dim, num_heads, ff_mult)
        self.causal = causal

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: (B, 1 + K F, d)
        t_tok, frames = x[:, :1], x[:, 1:]
        k = SLOTS_PER_FRAME
        seq = rearrange(frames, "b (f k) d -> (b k) f d", k=k)
        mask = None
        if self.causal:
            n = seq.shape[1]
            mask = frame_causal_mask(torch.arange(n, device=x.device)).expand(seq.shape[0], -1, -1)
        seq = self.block(seq, repeat(cond, "b d -> (b k) d", k=k), mask)
        return torch.cat([t_tok, rearrange(seq, "(b k) f d -> b (f k) d", k=k)], dim=1)


class PresentClipMotionPrior(ModelMixin, ConfigMixin):
    """The present-clip motion-prior diffusion model (epsilon prediction on motion tokens)."""

    @register_to_config
    def __init__(
        self,
        audio_dim: int = 80,
        ref_dim: int = 144,
        head_dim: int = HEAD_POSE_DIM,
        lip_dim: int = 16,
        expression_dim: int = 16,
        landmark_dim: int = 512,
        dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        ff_mult: int = 4,
        audio_window: int = 2,
        causal_temporal: bool = False,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        p_drop_landmarks: float = 0.5,
    ):
        super().__init__()
        if dim % num_heads:
            raise McdmError(f"motion prior: dim {dim} is not a multiple of num_heads {num_heads}")
        # conditions (standardised per channel with training statistics, see fit_condition_statistics)
        self.register_buffer("audio_mean", torch.zeros(audio_dim))
        self.register_buffer("audio_std", torch.ones(audio_dim))
        self.register_buffer("ref_mean", torch.zeros(ref_dim))
        self.register_buffer("ref_std", torch.ones(ref_dim))
        self.audio_in = nn.Linear((2 * audio_window + 1) * audio_dim, dim)
        self.image_in = nn.Linear(ref_dim, dim)
        self.film = FiLM(dim, dim)
        self.time_proj = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(dim, dim)
        self.ref_to_cond = nn.Linear(ref_dim, dim)
        # motion tokens (the same embeddings make F_pc, see present_clip_tokens)
        self.head_in = nn.Linear(head_dim, dim)
        self.lip_in = nn.Linear(lip_dim, dim)
        self.expression_in = nn.Linear(expression_dim, dim)
        self.landmark_in = nn.Sequential(nn.LayerNorm(landmark_dim), nn.Linear(landmark_dim, dim))
        self.type_embedding = nn.Embedding(SLOTS_PER_FRAME + 1, dim)
        # L x (multimodal causal block + temporal interaction block)
        self.causal_blocks = nn.ModuleList(MultimodalCausalBlock(dim, num_heads, ff_mult) for _ in range(num_layers))
        self.temporal_blocks = nn.ModuleList(
            TemporalInteractionBlock(dim, num_heads, ff_mult, causal_temporal) for _ in range(num_layers)
        )
        # output: adaptive final norm + one zero-initialised head per denoised slot
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.head_out = nn.Linear(dim, head_dim)
        self.lip_out = nn.Linear(dim, lip_dim)
        self.expression_out = nn.Linear(dim, expression_dim)
        for layer in (self.head_out, self.lip_out, self.expression_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.present_clip_norm = nn.LayerNorm(dim, elementwise_affine=False)

    # ------------------------------------------------------------------ schedulers
    def _scheduler_kwargs(self) -> dict:
        """Training (DDPM) and sampling (DDIM) schedule of the prior. Sampling timesteps are spaced
        "leading" with SD's ``steps_offset=1`` (first step t = 951 of 1000 at 20 steps), never t = 999:
        the cosine schedule's abar_999 is 2.4e-9, so the x0 estimate (z - sqrt(1 - abar) eps) / sqrt(abar)
        of a "trailing" first step amplified the prior's epsilon error 20,000-fold (sampled tokens of
        +-2e4 where standardised tokens are +-3). x0 is clipped to +-``PRIOR_X0_RANGE`` standard
        deviations at every step as a guard."""
        return dict(num_train_timesteps=self.config.num_train_timesteps, beta_schedule=self.config.beta_schedule,
                    prediction_type="epsilon", clip_sample=True, clip_sample_range=PRIOR_X0_RANGE,
                    timestep_spacing="leading", steps_offset=1)

    @property
    def noise_scheduler(self) -> DDPMScheduler:
        """The training scheduler of Eq. 3 (rebuilt from the config, so it is saved with the model)."""
        if getattr(self, "_noise_scheduler", None) is None:
            self._noise_scheduler = DDPMScheduler(**self._scheduler_kwargs())
        return self._noise_scheduler

    @property
    def num_present_clip_tokens(self) -> int:
        return 3

    @torch.no_grad()
    def fit_condition_statistics(self, audio_frames: torch.Tensor, ref_embeddings: torch.Tensor) -> "PresentClipMotionPrior":
        """Per-channel mean / std of the training audio frames (N, A) and reference embeddings (M, E);
        call once before training. Per-channel (not per-frame LayerNorm) keeps loudness, a lip cue."""
        for name, x in (("audio", audio_frames), ("ref", ref_embeddings)):
            x = x.float().to(self.device)
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp(min=1e-3) if len(x) > 1 else torch.ones_like(x[0]))
        return self

    def _ref(self, ref_embedding: torch.Tensor) -> torch.Tensor:
        return (ref_embedding.float() - self.ref_mean) / self.ref_std

    # ------------------------------------------------------------------ denoiser
    def condition_tokens(self, audio: torch.Tensor, ref_embedding: torch.Tensor) -> torch.Tensor:
        """Multimodal correlation tokens c_f = FiLM(a_f | i_f): (B, F, A), (B, E) -> (B, F, d)."""
        b, n_frames = audio.shape[:2]
        # audio token of frame f from the window f - w .. f + w (edges repeated)
        a = (audio.float() - self.audio_mean) / self.audio_std
        a = rearrange(frame_windows(rearrange(a, "b f a -> f b a"), 2 * self.config.audio_window + 1), "f w b a -> b f (w a)")
        a = self.audio_in(a)
        # image tokens of the reference, replicated along time to align with the audio
        i = repeat(self.image_in(self._ref(ref_embedding)), "b d -> b f d", f=n_frames)
        return self.film(a, i)

    def forward(
        self,
        noisy_head: torch.Tensor,
        noisy_lip: torch.Tensor,
        noisy_expression: torch.Tensor,
        timestep: torch.Tensor,
        audio: torch.Tensor,
        ref_embedding: torch.Tensor,
        landmarks: Optional[torch.Tensor] = None,
        landmark_mask: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """eps_theta(z_t, t, F_p). noisy_*: (B, F, dim_*); timestep: (B,) or scalar; audio: (B, F, A);
        ref_embedding: (B, E); landmarks: (B, F, landmark_dim) landmark tokens or None;
        landmark_mask: (B,) bool, which items use their landmarks (default: all when given).
        Where landmarks are used, the head slot holds the landmark token and its eps output is unused."""
        b, n_frames = noisy_lip.shape[:2]
        d = self.config.dim
        # 1. time: t -> (B, d); it is both a sequence token and (with the reference) the adaLN condition
        timestep = torch.as_tensor(timestep, device=noisy_lip.device).reshape(-1).expand(b)
        t_emb = self.time_embedding(self.time_proj(timestep).to(noisy_lip.dtype))
        cond = t_emb + self.ref_to_cond(self._ref(ref_embedding))

        # 2. multimodal correlation tokens (FiLM of audio by the replicated image tokens)
        correlation = self.condition_tokens(audio, ref_embedding)

        # 3. motion slots: noisy head (or landmark condition), noisy lip, noisy expression
        types = self.type_embedding.weight
        head_tok = self.head_in(noisy_head.float()) + types[SLOT_HEAD]
        if landmarks is not None:
            lm_tok = self.landmark_in(landmarks.float()) + types[TYPE_LANDMARK]
            use = torch.ones(b, dtype=torch.bool, device=lm_tok.device) if landmark_mask is None else landmark_mask
            head_tok = torch.where(use[:, None, None], lm_tok, head_tok)
        slots = torch.stack([
            correlation + types[SLOT_CORRELATION],
            head_tok,
            self.lip_in(noisy_lip.float()) + types[SLOT_LIP],
            self.expression_in(noisy_expression.float()) + types[SLOT_EXPRESSION],
        ], dim=2)  # (B, F, K, d)
        frame_pos = get_timestep_embedding(torch.arange(n_frames, device=slots.device), d, flip_sin_to_cos=True, downscale_freq_shift=0)
        slots = slots + frame_pos[None, :, None, :].to(slots.dtype)

        # 4. one sequence: [t] + frame-major slots, and its frame-causal mask
        x = torch.cat([t_emb[:, None], rearrange(slots, "b f k d -> b (f k) d")], dim=1)  # (B, 1 + K F, d)
        frame_index = torch.cat([torch.tensor([-1], device=x.device),
                                 repeat(torch.arange(n_frames, device=x.device), "f -> (f k)", k=SLOTS_PER_FRAME)])
        causal_mask = frame_causal_mask(frame_index)

        # 5. L x (multimodal causal block, temporal interaction block)
        for causal_block, temporal_block in zip(self.causal_blocks, self.temporal_blocks):
            x = causal_block(x, cond, causal_mask)
            x = temporal_block(x, cond)

        # 6. output: eps of each noisy slot
        x = self.norm_out(x[:, 1:], cond)
        x = rearrange(x, "b (f k) d -> b f k d", k=SLOTS_PER_FRAME)
        out = MotionPriorOutput(
            head=self.head_out(x[:, :, SLOT_HEAD]),
            lip=self.lip_out(x[:, :, SLOT_LIP]),
            expression=self.expression_out(x[:, :, SLOT_EXPRESSION]),
        )
        return out if return_dict else (out.head, out.lip, out.expression)

    # ------------------------------------------------------------------ training (Eq. 3)
    def landmark_keep_mask(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B,) bool: True where the item keeps its landmark clip; each whole clip is dropped with
        probability ``p_drop_landmarks`` (simulates generation without a driving video)."""
        u = torch.rand(batch_size, generator=generator, device=generator.device if generator is not None else "cpu")
        return (u >= self.config.p_drop_landmarks).to(device or self.device)

    def training_losses(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Eq. 3: L_prior = E_{t, eps} || eps - eps_theta(z_t, t, F_p) ||^2, averaged over the denoised
        elements. ``batch``: ``audio`` (B, F, A), ``ref_embedding`` (B, E), ``head`` (B, F, 6), ``lip``
        (B, F, lip_dim), ``expression`` (B, F, expression_dim), optional ``landmarks`` (B, F, landmark_dim).
        Returns ``loss`` and the per-slot MSEs (``head`` over the items denoising it) and ``landmark_kept``."""
        dev = self.device
        x0 = {k: batch[k].to(dev).float() for k in ("head", "lip", "expression")}
        b = x0["lip"].shape[0]
        gdev = generator.device if generator is not None else "cpu"
        timesteps = torch.randint(0, self.config.num_train_timesteps, (b,), generator=generator, device=gdev).to(dev)
        noise = {k: torch.randn(v.shape, generator=generator, device=gdev).to(dev) for k, v in x0.items()}
        z_t = {k: self.noise_scheduler.add_noise(x0[k], noise[k], timesteps) for k in x0}

        landmarks = batch.get("landmarks")
        keep = None
        if landmarks is not None:
            landmarks = landmarks.to(dev)
            keep = self.landmark_keep_mask(b, dev, generator)
        pred = self(z_t["head"], z_t["lip"], z_t["expression"], timesteps, batch["audio"].to(dev),
                    batch["ref_embedding"].to(dev), landmarks=landmarks, landmark_mask=keep)

        # squared error per item; the head counts only where it was denoised (no landmarks)
        head_w = torch.ones(b, device=dev) if keep is None else (~keep).float()
        se = {k: ((getattr(pred, k) - noise[k]) ** 2).flatten(1).sum(1) for k in x0}
        n = {k: x0[k][0].numel() for k in x0}
        total = (se["head"] * head_w).sum() + se["lip"].sum() + se["expression"].sum()
        count = head_w.sum() * n["head"] + b * (n["lip"] + n["expression"])
        return {
            "loss": total / count,
            "head": (se["head"] * head_w).sum() / (head_w.sum() * n["head"]).clamp(min=1),
            "lip": se["lip"].mean() / n["lip"],
            "expression": se["expression"].mean() / n["expression"],
            "landmark_kept": torch.zeros(()) if keep is None else keep.float().mean(),
        }

    def training_loss(self, batch: dict, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scalar Eq. 3 loss of a batch (see ``training_losses``)."""
        return self.training_losses(batch, generator)["loss"]

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def sample(
        self,
        audio_feats: torch.Tensor,
        ref_embedding: torch.Tensor,
        landmarks: Optional[torch.Tensor] = None,
        head: Optional[torch.Tensor] = None,
        num_inference_steps: int = 20,
        generator: Optional[torch.Generator] = None,
        scheduler=None,
        eta: float = 0.0,
    ) -> MotionPriorOutput:
        """Motion tokens of a clip of F = audio_feats.shape[1] frames by reverse diffusion.

        ``scheduler``: a diffusers scheduler (default DDIM, built from the training schedule; a
        ``DDPMScheduler`` works too). With ``landmarks`` (B, F, landmark_dim tokens from the frozen
        landmark guider), only lip and expression are denoised and the returned head is ``head``, the
        driving video's head tokens (``head_pose_from_landmarks`` -> ``HeadPoseEncoder``)."""
        if landmarks is not None and head is None:
            raise McdmError("motion prior sample: landmarks given without head: pass the driving video's head tokens")
        dev = self.device
        audio_feats, ref_embedding = audio_feats.to(dev), ref_embedding.to(dev)
        b, n_frames = audio_feats.shape[:2]
        dims = [self.config.head_dim, self.config.lip_dim, self.config.expression_dim]
        if scheduler is None:
            scheduler = DDIMScheduler(**self._scheduler_kwargs())
        scheduler.set_timesteps(num_inference_steps, device=dev)
        # the three noisy slots travel as one tensor, so every scheduler step treats them alike
        z = randn_tensor((b, n_frames, sum(dims)), generator=generator, device=dev) * scheduler.init_noise_sigma
        step_kwargs = {"eta": eta, "generator": generator} if isinstance(scheduler, DDIMScheduler) else {"generator": generator}
        for t in scheduler.timesteps:
            z_in = scheduler.scale_model_input(z, t)
            zh, zl, ze = z_in.split(dims, dim=-1)
            eps = self(zh, zl, ze, t, audio_feats, ref_embedding, landmarks=None if landmarks is None else landmarks.to(dev))
            z = scheduler.step(torch.cat([eps.head, eps.lip, eps.expression], -1), t, z, **step_kwargs).prev_sample
        zh, zl, ze = z.split(dims, dim=-1)
        return MotionPriorOutput(head=zh if landmarks is None else head.to(dev).float(), lip=zl, expression=ze)

    # ------------------------------------------------------------------ interface to the UNet
    def present_clip_tokens(self, head: torch.Tensor, lip: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """F_pc (B, F, 3, d): per frame the head, lip and expression tokens embedded by the prior's own
        (stage-2 trained) token embeddings plus their type embedding, layer-normalised. The UNet's
        present-clip reference attention attends, in frame f, to these 3 tokens."""
        types = self.type_embedding.weight
        tokens = torch.stack([
            self.head_in(head.float()) + types[SLOT_HEAD],
            self.lip_in(lip.float()) + types[SLOT_LIP],
            self.expression_in(expression.float()) + types[SLOT_EXPRESSION],
        ], dim=2)
        return self.present_clip_norm(tokens)
