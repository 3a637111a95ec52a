"""Benchmark-only baseline: softmax temporal attention that keeps the keys / values of EVERY earlier clip.

What a model without the MTA memory (``wo_mta``'s ``SoftmaxTemporalAttnProcessor``) would have to carry
from clip to clip to see the whole past: each temporal attention layer caches the keys and values of
all frames generated so far, and the present clip's queries run exact softmax attention over
[history ; present]. Frames keep their absolute temporal positions (0, 1, ..., L + T - 1), so

- with no history (the first clip) the output is exactly ``SoftmaxTemporalAttnProcessor``'s, and
- after clips 1..k-1 the output for clip k equals ``SoftmaxTemporalAttnProcessor`` run over the k clips
  concatenated along time, restricted to clip k's frames (non-causal attention: a query row sees every
  key, and a row's result depends only on its query).

The state (``memory`` in, second return value out) is ``(b s, 2, L, c)``: keys and values of the L past
frames; it grows by T frames per clip, where MTA carries one memory frame ``(b s, c)`` (Eq. 4-5).
Swapped in with ``MCDMUNet.set_temporal_processor`` (the weights of ``attn_temporal`` are reused as
they are); the UNet and the pipeline carry its state as they carry the MTA memory. Not part of the
``mcdm`` package: it exists so ``bench_generation.py`` can show what the fixed-size memory saves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_timestep_embedding

from mcdm.errors import McdmError
from mcdm.models.temporal_attention import (
    _check_frames,
    _fold_time,
    _layer_norm,
    _project_out,
    _split_heads,
    _unfold_time,
)


def positions_from(start: int, length: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of temporal positions start..start+length-1, (length, dim); the rows of
    ``frame_position_embedding(start + length, dim)`` from ``start`` on, without computing the others."""
    positions = torch.arange(start, start + length, device=like.device)
    return get_timestep_embedding(positions, dim, flip_sin_to_cos=True, downscale_freq_shift=0).to(like.dtype)


class FullHistoryKVTemporalAttnProcessor:
    """``wo_mta``'s softmax temporal attention with a key / value cache of every earlier frame.

    ``memory`` (in): ``(b s, 2, L, c)`` keys and values of the L earlier frames, or None for the first
    clip; (out): ``(b s, 2, L + T, c)`` with the present clip appended.
    """

    kind = "full_history_kv"

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
        # 1. as wo_mta: F_ac^ref + F_pc^ref summed (h counted once), normalised, folded along time
        residuals = [r for r in (archived_residual, present_residual) if r is not None]
        x = _fold_time(_layer_norm(hidden_states + sum(residuals)), num_frames)  # (b s) T c
        if memory is not None and (memory.ndim != 4 or memory.shape[:2] != (x.shape[0], 2)
                                   or memory.shape[3] != attn.inner_dim):
            raise McdmError(f"full-history attention: state of shape {tuple(memory.shape)} is not "
                            f"(batch*tokens={x.shape[0]}, 2, frames, {attn.inner_dim})")
        past = 0 if memory is None else memory.shape[2]
        # 2. the present frames sit at positions L..L+T-1, after the L frames of history
        x = x + positions_from(past, num_frames, x.shape[-1], x)
        present_kv = torch.stack([attn.to_k(x), attn.to_v(x)], dim=1)  # (b s) 2 T c
        history = present_kv if memory is None else torch.cat([memory, present_kv], dim=2)  # (b s) 2 (L+T) c
        # 3. exact softmax attention: the T present queries over the L + T cached keys / values
        q = _split_heads(attn, attn.to_q(x))  # (b s) h T d
        k, v = (_split_heads(attn, t) for t in history.unbind(dim=1))  # (b s) h (L+T) d
        out = F.scaled_dot_product_attention(q, k, v)
        # 4. output projection, unfolded back to (b f) s c; the cache (with this clip) is the new state
        return _unfold_time(_project_out(attn, out), num_frames, tokens), history
