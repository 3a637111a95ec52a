"""Temporal attention of the denoising UNet: FAVOR+ fast attention, the motion memory, and processors.

The fourth attention of every MCDM transformer block runs along the time axis (paper Sec. 3.4).
Its weights live in a diffusers ``Attention`` (``attn_temporal``); the maths lives in the processors
below, swapped with ``set_processor`` / ``set_attn_processor``:

- ``MemoryTemporalAttnProcessor`` (MTA, the full model): a motion memory built from the archived-clip
  reference features (Eq. 4-5, per frame, decisions.md #6) is concatenated with the present-clip reference
  features along time (2T), FAVOR+ fast attention runs over the 2T tokens, and the half aligned with the
  present clip is the output F_m. Only the last memory state is carried to the next clip.
- ``SoftmaxTemporalAttnProcessor`` (``wo_mta``): standard softmax temporal self-attention over the T
  frames of the clip, on F_ac^ref and F_pc^ref summed; no memory.
- ``FullHistorySoftmaxAttnProcessor`` (benchmarks only): keeps every past frame's archived features and
  runs softmax attention over [history; present]; its state grows with the history.

Every processor receives the block's stream after self-attention ``hidden_states`` (``h``, frames
folded into the batch: ``(b f) s c``) and the two reference-attention outputs ``archived_residual``
(``F_ac^ref - h``) and ``present_residual`` (``F_pc^ref - h``); it returns ``(delta, memory)`` where
``delta`` is added to ``h + archived_residual + present_residual`` by the block. Inputs are normalised
with an affine-free LayerNorm (the q/k/v projections absorb the scale), so processors own no weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_timestep_embedding
from einops import rearrange

from mcdm.errors import McdmError

# --------------------------------------------------------------------------------------------------
# FAVOR+ (Choromanski et al. 2020, "Rethinking Attention with Performers")
# --------------------------------------------------------------------------------------------------


def orthogonal_random_features(num_features: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Random projection W (num_features, dim) with orthogonal rows within each block of ``dim`` rows.

    Each block is the Q of a Gaussian matrix's QR decomposition; rows are then rescaled by the norms of
    independent Gaussian vectors so each row is marginally N(0, I_dim) (Performer's "ORF" construction).
    Deterministic in ``seed`` (so a saved model reloads to identical outputs without storing W).
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T)
    w = torch.cat(blocks)[:num_features]
    row_norms = torch.randn(num_features, dim, generator=gen, dtype=torch.float64).norm(dim=1)
    return (row_norms[:, None] * w).float()


def positive_random_features(
    x: torch.Tensor, projection: torch.Tensor, is_query: bool, eps: float = 1e-6
) -> torch.Tensor:
    """FAVOR+ positive features of x' = x d^-1/4: phi(x') = exp(W x' - |x'|^2 / 2) / sqrt(m).

    E[phi(q') . phi(k')] = exp(q' . k') = exp(q . k / sqrt(d)) (Performer, Lemma 1), so phi(Q) phi(K)^T
    estimates the unnormalised softmax kernel. x: (..., L, d); projection W: (m, d). Constant factors
    cancel in the normalisation of ``favor_attention``: the 1/sqrt(m) is dropped, and a per-row
    (queries) or per-sequence (keys) max is subtracted for numerical stability. ``eps`` keeps the
    normaliser positive if every feature underflows.
    """
    dim = x.shape[-1]
    z = x @ (projection.to(x.dtype) * dim**-0.25).T - (x * x).sum(dim=-1, keepdim=True) * (dim**-0.5 / 2)
    if is_query:
        z = z - z.amax(dim=-1, keepdim=True).detach()
    else:
        z = z - z.amax(dim=(-1, -2), keepdim=True).detach()
    # exp(-80) ~ 1e-35 is far below eps; the clamp keeps exp off its slow underflow path on CPU
    return torch.exp(z.clamp(min=-80.0)) + eps


def favor_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, projection: torch.Tensor
) -> torch.Tensor:
    """Bidirectional FAVOR+ attention, ~ softmax(Q K^T / sqrt(d)) V in O(L m d) time and O(L m) memory.

    query, key, value: (..., L, d); projection: (m, d) from ``orthogonal_random_features``.
    out = D^-1 (phi(Q) (phi(K)^T V)),  D = diag(phi(Q) (phi(K)^T 1)).
    """
    q_prime = positive_random_features(query, projection, is_query=True)  # (..., L, m)
    k_prime = positive_random_features(key, projection, is_query=False)  # (..., L, m)
    kv = k_prime.transpose(-1, -2) @ value  # (..., m, d): phi(K)^T V, never an L x L matrix
    numerator = q_prime @ kv  # (..., L, d)
    denominator = q_prime @ k_prime.sum(dim=-2).unsqueeze(-1)  # (..., L, 1)
    return numerator / denominator


def softmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Exact softmax(Q K^T / sqrt(d)) V with the L x L score matrix written out (the quadratic baseline)."""
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    return scores.softmax(dim=-1) @ value


@dataclass(frozen=True)
class AttentionCost:
    """Multiply-accumulate FLOPs (2 per MAC) and the largest intermediate, in elements."""

    flops: int
    peak_elements: int


def attention_cost(kind: str, length: int, dim: int, num_features: int = 0, batch: int = 1) -> AttentionCost:
    """Analytic cost of one attention over a sequence of ``length`` tokens of width ``dim``.

    ``softmax``: QK^T and AV, 2 * 2 * L^2 d; largest intermediate the L x L scores.
    ``favor``: the phi(Q), phi(K) projections 2 * 2 L m d, phi(K)^T V 2 L m d, phi(Q) (phi(K)^T V)
    2 L m d, the normaliser phi(Q) (phi(K)^T 1) 2 L m; largest intermediate L x m features (or m x d).
    Linear in L. Both count matrix products only (what ``torch.utils.flop_counter`` counts).
    """
    L, d, m = length, dim, num_features
    if kind == "softmax":
        return AttentionCost(batch * 4 * L * L * d, batch * L * L)
    if kind == "favor":
        if m <= 0:
            raise McdmError("attention_cost: favor needs num_features > 0")
        return AttentionCost(batch * (8 * L * m * d + 2 * L * m), batch * max(L * m, m * d))
    raise McdmError(f"attention_cost: unknown kind {kind!r} (softmax or favor)")


# --------------------------------------------------------------------------------------------------
# Motion memory (Eq. 4-5)
# --------------------------------------------------------------------------------------------------


def motion_memory(
    archived_features: torch.Tensor, alpha: float, initial: torch.Tensor | None = None
) -> torch.Tensor:
    """The memory state aligned with each frame of a clip, per decisions.md #6.

    archived_features: (N, T, C) = F_ac,f^ref for f = 1..T; initial: (N, C) state carried from the
    previous clip, or None for the first clip. Returns (N, T, C) = M_1..M_T:
        M_1 = F_ac,1^ref                                 (Eq. 4; with a carried state, Eq. 5 continues)
        M_f = alpha * M_{f-1} + (1 - alpha) * F_ac,f^ref  (Eq. 5)
    Only M_T needs to be kept for the next clip, so memory does not grow with the history.
    """
    if not 0.0 <= alpha <= 1.0:
        raise McdmError(f"alpha: must be in [0, 1] (got {alpha})")
    state = initial
    states = []
    for f in range(archived_features.shape[1]):
        current = archived_features[:, f]
        state = current if state is None else alpha * state + (1.0 - alpha) * current
        states.append(state)
    return torch.stack(states, dim=1)


def detach_memory(memory_state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Detached copy of a memory state (stage 3 carries memory across clips without backprop through it)."""
    if memory_state is None:
        return None
    return {name: state.detach() for name, state in memory_state.items()}


# --------------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------------


def frame_position_embedding(length: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of temporal positions 0..length-1, (length, dim) (no parameters)."""
    positions = torch.arange(length, device=like.device)
    return get_timestep_embedding(positions, dim, flip_sin_to_cos=True, downscale_freq_shift=0).to(like.dtype)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],))


def _split_heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "n l (h d) -> n h l d", h=attn.heads)


def _fold_time(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    return rearrange(x, "(b f) s c -> (b s) f c", f=num_frames)


def _unfold_time(x: torch.Tensor, num_frames: int, tokens: int) -> torch.Tensor:
    return rearrange(x, "(b s) f c -> (b f) s c", s=tokens, f=num_frames)


def _project_out(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    x = rearrange(x, "n h l d -> n l (h d)")
    return attn.to_out[1](attn.to_out[0](x))


def _check_frames(hidden_states: torch.Tensor, num_frames: int) -> None:
    if num_frames < 1 or hidden_states.shape[0] % num_frames:
        raise McdmError(
            f"temporal attention: batch*frames {hidden_states.shape[0]} is not a multiple of num_frames {num_frames}"
        )


class SoftmaxTemporalAttnProcessor:
    """``wo_mta``: softmax self-attention along time over the clip's T frames; F_ac^ref + F_pc^ref summed."""

    kind = "softmax"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        archived_residual: torch.Tensor | None = None,
        present_residual: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        num_frames: int = 1,
    ) -> tuple[torch.Tensor, None]:
        _check_frames(hidden_states, num_frames)
        tokens = hidden_states.shape[1]
        # 1. F_ac^ref + F_pc^ref summed (the residual h counted once), normalised, folded along time
        summed = hidden_states
        for residual in (archived_residual, present_residual):
            if residual is not None:
                summed = summed + residual
        x = _fold_time(_layer_norm(summed), num_frames)  # (b s) f c
        x = x + frame_position_embedding(num_frames, x.shape[-1], x)
        # 2. softmax attention along time
        q, k, v = (_split_heads(attn, proj(x)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        # 3. output projection, unfolded back to (b f) s c
        return _unfold_time(_project_out(attn, out), num_frames, tokens), None


class MemoryTemporalAttnProcessor:
    """MTA (Sec. 3.4): FAVOR+ temporal attention over [M_1..M_T ; F_pc,1^ref..F_pc,T^ref].

    ``memory`` (in): (b s, c) state carried from the previous clip or None; (out): M_T, same shape.
    """

    kind = "mta"

    def __init__(self, alpha: float = 0.1, num_features: int = 32, seed: int = 0):
        if not 0.0 <= alpha <= 1.0:
            raise McdmError(f"alpha: must be in [0, 1] (got {alpha})")
        self.alpha = float(alpha)
        self.num_features = int(num_features)
        self.seed = int(seed)
        self._projections: dict[tuple, torch.Tensor] = {}

    def projection(self, dim_head: int, device: torch.device) -> torch.Tensor:
        key = (dim_head, str(device))
        if key not in self._projections:
            self._projections[key] = orthogonal_random_features(self.num_features, dim_head, self.seed).to(device)
        return self._projections[key]

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        archived_residual: torch.Tensor | None = None,
        present_residual: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        num_frames: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_frames(hidden_states, num_frames)
        tokens = hidden_states.shape[1]
        if archived_residual is None:
            raise McdmError("MTA needs the archived-clip reference attention output (archived_residual)")
        # 1. reference features F_ac^ref = h + attn_archived(.), F_pc^ref = h + attn_present(.), along time
        f_ac_ref = _fold_time(_layer_norm(hidden_states + archived_residual), num_frames)  # (b s) T c
        f_pc_ref = hidden_states if present_residual is None else hidden_states + present_residual
        f_pc_ref = _fold_time(_layer_norm(f_pc_ref), num_frames)  # (b s) T c
        if memory is not None and memory.shape != (f_ac_ref.shape[0], f_ac_ref.shape[2]):
            raise McdmError(
                f"MTA memory: shape {tuple(memory.shape)} does not match (batch*tokens, channels) "
                f"{(f_ac_ref.shape[0], f_ac_ref.shape[2])}"
            )
        # 2. Eq. 4-5 per frame: M_1 = F_ac,1^ref; M_f = alpha * M_{f-1} + (1 - alpha) * F_ac,f^ref
        memory_states = motion_memory(f_ac_ref, self.alpha, memory)  # (b s) T c
        # 3. F_m^cat = [M ; F_pc^ref] along time (2T), temporal positions 0..2T-1
        x = torch.cat([memory_states, f_pc_ref], dim=1)
        x = x + frame_position_embedding(2 * num_frames, x.shape[-1], x)
        # 4. fast attention (FAVOR+) along the 2T axis
        q, k, v = (_split_heads(attn, proj(x)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        # (in float32: exp features lose too much in bf16 / fp16 mixed-precision training)
        out = favor_attention(q.float(), k.float(), v.float(), self.projection(q.shape[-1], q.device))
        out = _project_out(attn, out.to(q.dtype))
        # 5. the lower half (aligned with the present clip) is F_m
        f_m = out[:, num_frames:]
        return _unfold_time(f_m, num_frames, tokens), memory_states[:, -1]


class FullHistorySoftmaxAttnProcessor:
    """Benchmark-only baseline: softmax temporal attention over the FULL archived history.

    The state is every past frame's archived features (b s, L, c): it grows by T frames per clip, and
    each clip attends over [history ; present], so cost and memory grow with the history length L.
    """

    kind = "full_history_softmax"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        archived_residual: torch.Tensor | None = None,
        present_residual: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        num_frames: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_frames(hidden_states, num_frames)
        tokens = hidden_states.shape[1]
        f_ac_ref = _fold_time(_layer_norm(hidden_states + archived_residual), num_frames)
        f_pc_ref = hidden_states if present_residual is None else hidden_states + present_residual
        f_pc_ref = _fold_time(_layer_norm(f_pc_ref), num_frames)
        history = f_ac_ref if memory is None else torch.cat([memory, f_ac_ref], dim=1)  # (b s) L c
        x = torch.cat([history, f_pc_ref], dim=1)
        x = x + frame_position_embedding(x.shape[1], x.shape[-1], x)
        q = _split_heads(attn, attn.to_q(x[:, history.shape[1]:]))  # present queries only
        k, v = (_split_heads(attn, proj(x)) for proj in (attn.to_k, attn.to_v))
        out = _project_out(attn, F.scaled_dot_product_attention(q, k, v))
        return _unfold_time(out, num_frames, tokens), history


def make_temporal_processor(kind: str, alpha: float = 0.1, num_features: int = 32, seed: int = 0):
    """The processor for ``kind`` (``mta`` or ``softmax``)."""
    if kind == "mta":
        return MemoryTemporalAttnProcessor(alpha=alpha, num_features=num_features, seed=seed)
    if kind == "softmax":
        return SoftmaxTemporalAttnProcessor()
    raise McdmError(f"temporal_attention: unknown kind {kind!r} (choose from mta, softmax)")
