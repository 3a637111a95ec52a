"""The generation benchmark's full-history softmax baseline (benchmarks/full_history_attention.py).

Counts shapes and bytes only (decisions.md #14); the timings are the benchmark's business.
"""
from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import load_benchmark
from diffusers.models.attention_processor import Attention
from einops import rearrange

from mcdm.errors import McdmError
from mcdm.models.temporal_attention import (
    MemoryTemporalAttnProcessor,
    SoftmaxTemporalAttnProcessor,
    frame_position_embedding,
)
from mcdm.models.unet import MCDMUNet

B, T, S, CH = 2, 4, 6, 16  # videos, frames per clip, tokens per frame, channels


full_history = load_benchmark("full_history_attention")


def _attention(processor) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=CH, heads=2, dim_head=CH // 2, processor=processor).eval()


def _clip(seed: int):
    """h, archived residual, present residual of one clip: (b f, s, c) each."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B * T, S, CH, generator=g) for _ in range(3)]


def _concat_clips(clips) -> list[torch.Tensor]:
    """Clips (b f, s, c) joined along time into one video (b (k f), s, c)."""
    joined = []
    for parts in zip(*clips):
        stacked = torch.stack([rearrange(p, "(b f) s c -> b f s c", b=B) for p in parts], dim=1)
        joined.append(rearrange(stacked, "b k f s c -> (b k f) s c"))
    return joined


def test_without_history_it_is_the_softmax_temporal_attention():
    full = _attention(full_history.FullHistoryKVTemporalAttnProcessor())
    plain = _attention(SoftmaxTemporalAttnProcessor())
    h, a, p = _clip(0)
    with torch.no_grad():
        got, state = full(h, archived_residual=a, present_residual=p, num_frames=T)
        expected, _ = plain(h, archived_residual=a, present_residual=p, num_frames=T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert state.shape == (B * S, 2, T, CH)


@pytest.mark.parametrize("n_clips", [2, 3])
def test_with_history_it_is_softmax_attention_over_the_whole_video(n_clips):
    """Clip k after clips 1..k-1 = the softmax processor over the k clips joined, clip k's frames."""
    full = _attention(full_history.FullHistoryKVTemporalAttnProcessor())
    plain = _attention(SoftmaxTemporalAttnProcessor())
    clips = [_clip(seed) for seed in range(n_clips)]
    state = None
    with torch.no_grad():
        for h, a, p in clips:
            got, state = full(h, archived_residual=a, present_residual=p, num_frames=T, memory=state)
        h, a, p = _concat_clips(clips)
        whole, _ = plain(h, archived_residual=a, present_residual=p, num_frames=n_clips * T)
    expected = rearrange(whole, "(b k f) s c -> b k f s c", b=B, k=n_clips)[:, -1]
    torch.testing.assert_close(got, rearrange(expected, "b f s c -> (b f) s c"), rtol=1e-5, atol=1e-6)
    assert state.shape == (B * S, 2, n_clips * T, CH)


def test_positions_continue_the_frame_embedding():
    like = torch.zeros(1)
    torch.testing.assert_close(full_history.positions_from(5, 3, CH, like), frame_position_embedding(8, CH, like)[5:])


def test_full_history_state_grows_by_a_clip_mta_state_stays_one_frame():
    full = _attention(full_history.FullHistoryKVTemporalAttnProcessor())
    mta = _attention(MemoryTemporalAttnProcessor(num_features=16))
    full_state = mta_state = None
    full_bytes, mta_bytes = [], []
    with torch.no_grad():
        for seed in range(4):
            h, a, p = _clip(seed)
            _, full_state = full(h, archived_residual=a, present_residual=p, num_frames=T, memory=full_state)
            _, mta_state = mta(h, archived_residual=a, present_residual=p, num_frames=T, memory=mta_state)
            full_bytes.append(full_state.numel() * full_state.element_size())
            mta_bytes.append(mta_state.numel() * mta_state.element_size())
    per_clip = B * S * 2 * T * CH * 4  # keys and values of T frames, float32
    assert full_bytes == [per_clip * k for k in (1, 2, 3, 4)]
    assert mta_bytes == [B * S * CH * 4] * 4  # M_T: one frame, whatever the history


def test_bad_state_is_one_line_error():
    full = _attention(full_history.FullHistoryKVTemporalAttnProcessor())
    h, a, p = _clip(0)
    with pytest.raises(McdmError, match="full-history attention: state"):
        full(h, archived_residual=a, present_residual=p, num_frames=T, memory=torch.zeros(B * S, CH))


# ---------------------------------------------------------------------------------- in the UNet


def _unet_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(1, 4, T, 8, 8, generator=g), timestep=500,
                archived_tokens=torch.randn(1, 12, 64, generator=g),
                present_tokens=torch.randn(1, T, 3, 64, generator=g))


@pytest.fixture
def unet() -> MCDMUNet:
    torch.manual_seed(0)
    model = MCDMUNet(temporal_attention="mta", mta_features=16).eval()
    with torch.no_grad():  # the temporal output projections start at zero: make them count
        for block in model.transformer_blocks():
            block.attn_temporal.to_out[0].weight.normal_(0, 0.2)
    return model


def test_unet_carries_a_growing_history_where_mta_carries_one_frame(unet):
    def carried(processor) -> list[dict[str, tuple]]:
        unet.set_temporal_processor(processor)
        state, shapes = None, []
        with torch.no_grad():
            for clip in range(3):
                state = unet(**_unet_inputs(clip), memory_state=state).memory_state
                shapes.append({k: tuple(v.shape) for k, v in state.items()})
        return shapes

    mta = carried(unet.temporal_processor)  # the model's own MTA
    full = carried(full_history.FullHistoryKVTemporalAttnProcessor())
    assert mta[0] == mta[1] == mta[2]
    assert set(full[0]) == set(mta[0])  # every temporal-attention layer keeps a history
    for name, (batch, tokens, channels) in mta[0].items():
        assert [shapes[name] for shapes in full] == [(batch, tokens, 2, k * T, channels) for k in (1, 2, 3)]


def test_unet_first_clip_matches_wo_mta(unet):
    outputs = {}
    for name, processor in (("softmax", SoftmaxTemporalAttnProcessor()),
                            ("full", full_history.FullHistoryKVTemporalAttnProcessor())):
        unet.set_temporal_processor(processor)
        with torch.no_grad():
            outputs[name] = unet(**_unet_inputs(0)).sample
    torch.testing.assert_close(outputs["full"], outputs["softmax"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- the report


def test_write_merged_keeps_other_keys(tmp_path):
    bench = load_benchmark("bench_generation")
    out = tmp_path / "benchmarks.json"
    out.write_text(json.dumps({"temporal_attention": {"cpu": 1}, "generation": {"constant_memory": {"x": 1}}}))
    bench.write_merged(out, {"full_history_baseline": {"runs": []}})
    data = json.loads(out.read_text())
    assert data == {"temporal_attention": {"cpu": 1},
                    "generation": {"constant_memory": {"x": 1}, "full_history_baseline": {"runs": []}}}
