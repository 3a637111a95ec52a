"""Memory-efficient temporal attention: motion memory (Eq. 4-5), FAVOR+, processors, linear cost."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from scipy.special import softmax
from torch.utils.flop_counter import FlopCounterMode

from mcdm.errors import McdmError
from mcdm.models.temporal_attention import (
    FullHistorySoftmaxAttnProcessor,
    MemoryTemporalAttnProcessor,
    SoftmaxTemporalAttnProcessor,
    attention_cost,
    favor_attention,
    motion_memory,
    orthogonal_random_features,
    softmax_attention,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- memory


def _closed_form(features: np.ndarray, alpha: float, initial: np.ndarray | None) -> np.ndarray:
    """Eq. 5 unrolled: with no carried state M_f = a^(f-1) F_1 + sum_{j=2..f} (1-a) a^(f-j) F_j;
    with a carried state m0, M_f = a^f m0 + sum_{j=1..f} (1-a) a^(f-j) F_j (f counted from 1)."""
    n, t, c = features.shape
    out = np.zeros_like(features)
    for f in range(1, t + 1):
        if initial is None:
            acc = alpha ** (f - 1) * features[:, 0]
            first = 2
        else:
            acc = alpha**f * initial
            first = 1
        for j in range(first, f + 1):
            acc = acc + (1 - alpha) * alpha ** (f - j) * features[:, j - 1]
        out[:, f - 1] = acc
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("carried", [False, True])
def test_memory_equals_closed_form_of_eq5(alpha, carried):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    initial = torch.randn(3, 5, generator=g, dtype=torch.float64) if carried else None
    got = motion_memory(feats, alpha, initial).numpy()
    expected = _closed_form(feats.numpy(), alpha, None if initial is None else initial.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_alpha_extremes():
    feats = torch.randn(2, 6, 4)
    current_only = motion_memory(feats, 0.0)
    first_forever = motion_memory(feats, 1.0)
    torch.testing.assert_close(current_only, feats)  # alpha = 0: the current features
    torch.testing.assert_close(first_forever, feats[:, :1].expand_as(feats))  # alpha = 1: F_1 forever
    assert not torch.allclose(current_only, first_forever)
    with pytest.raises(McdmError, match="alpha"):
        motion_memory(feats, 1.5)


# ---------------------------------------------------------------------------------------------- FAVOR+


def test_favor_approximates_softmax_better_with_more_features():
    g = torch.Generator().manual_seed(0)
    q, k = (0.5 * torch.randn(4, 32, 16, generator=g) for _ in range(2))
    v = torch.randn(4, 32, 16, generator=g)
    qn, kn, vn = (x.double().numpy() for x in (q, k, v))
    exact = softmax(qn @ kn.transpose(0, 2, 1) / np.sqrt(16), axis=-1) @ vn  # scipy reference
    np.testing.assert_allclose(softmax_attention(q, k, v).double().numpy(), exact, rtol=1e-4, atol=1e-5)
    errors = []
    for m in (4, 64, 1024):
        rel = [
            np.linalg.norm(favor_attention(q, k, v, orthogonal_random_features(m, 16, seed)).double().numpy() - exact)
            / np.linalg.norm(exact)
            for seed in range(4)
        ]
        errors.append(float(np.mean(rel)))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.15 and errors[2] < errors[0] / 4, errors


def test_orthogonal_features_are_orthogonal_within_blocks_and_deterministic():
    w = orthogonal_random_features(12, 8, seed=3).double()
    block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(orthogonal_random_features(12, 8, seed=3), orthogonal_random_features(12, 8, seed=3))


def _flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def test_favor_cost_is_linear_in_length_softmax_quadratic():
    d, m = 16, 32
    projection = orthogonal_random_features(m, d)
    favor, exact = [], []
    for length in (64, 128, 256, 512):
        x = torch.randn(1, length, d)
        favor.append(_flops(favor_attention, x, x, x, projection))
        exact.append(_flops(softmax_attention, x, x, x))
        # the analytic counter (used by benchmarks/) agrees with torch's FLOP counter
        assert attention_cost("favor", length, d, m).flops == favor[-1]
        assert attention_cost("softmax", length, d).flops == exact[-1]
    assert all(b / a == pytest.approx(2.0) for a, b in zip(favor, favor[1:]))
    assert all(b / a == pytest.approx(4.0) for a, b in zip(exact, exact[1:]))
    assert attention_cost("favor", 4096, d, m).peak_elements < attention_cost("softmax", 4096, d).peak_elements / 100


# ---------------------------------------------------------------------------------------------- processors

BF, T, S, CH = 2 * 4, 4, 6, 16  # (batch * frames, frames, tokens, channels)


def _attention(processor) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=CH, heads=2, dim_head=CH // 2, processor=processor).eval()


def _streams(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BF, S, CH, generator=g) for _ in range(3)]  # h, archived residual, present residual


def test_mta_output_shapes_and_memory_is_last_state():
    attn = _attention(MemoryTemporalAttnProcessor(alpha=0.3, num_features=16))
    h, a, p = _streams()
    with torch.no_grad():
        delta, memory = attn(h, archived_residual=a, present_residual=p, num_frames=T)
    assert delta.shape == (BF, S, CH)
    assert memory.shape == (BF // T * S, CH)  # one frame's worth per (video, token): constant size
    # the state is M_T of the normalised archived-clip reference features
    f_ac = torch.nn.functional.layer_norm(h + a, (CH,))
    f_ac = f_ac.reshape(BF // T, T, S, CH).permute(0, 2, 1, 3).reshape(-1, T, CH)
    torch.testing.assert_close(memory, motion_memory(f_ac, 0.3)[:, -1])


def test_mta_alpha_zero_forgets_carried_memory_alpha_one_keeps_it():
    h, a, p = _streams()
    carried = torch.randn(BF // T * S, CH)
    with torch.no_grad():
        zero = _attention(MemoryTemporalAttnProcessor(alpha=0.0, num_features=16))
        torch.testing.assert_close(zero(h, archived_residual=a, present_residual=p, num_frames=T, memory=carried)[0],
                                   zero(h, archived_residual=a, present_residual=p, num_frames=T)[0])
        one = _attention(MemoryTemporalAttnProcessor(alpha=1.0, num_features=16))
        kept, memory = one(h, archived_residual=a, present_residual=p, num_frames=T, memory=carried)
        torch.testing.assert_close(memory, carried)  # alpha = 1: the memory never changes
        differ = one(h, archived_residual=a, present_residual=p, num_frames=T)[0]
        assert not torch.allclose(differ, kept, atol=1e-5)  # the carried memory matters with alpha = 1
        assert not torch.allclose(zero(h, archived_residual=a, present_residual=p, num_frames=T)[0],
                                  one(h, archived_residual=a, present_residual=p, num_frames=T)[0], atol=1e-5)


def test_mta_with_alpha_one_ignores_current_archived_features_given_memory():
    attn = _attention(MemoryTemporalAttnProcessor(alpha=1.0, num_features=16))
    h, a, p = _streams()
    carried = torch.randn(BF // T * S, CH)
    with torch.no_grad():
        out1, _ = attn(h, archived_residual=a, present_residual=p, num_frames=T, memory=carried)
        out2, _ = attn(h, archived_residual=torch.randn_like(a), present_residual=p, num_frames=T, memory=carried)
    torch.testing.assert_close(out1, out2)


def test_softmax_processor_sums_references_and_keeps_no_memory():
    attn = _attention(SoftmaxTemporalAttnProcessor())
    h, a, p = _streams()
    with torch.no_grad():
        out, memory = attn(h, archived_residual=a, present_residual=p, num_frames=T)
        swapped, _ = attn(h, archived_residual=p, present_residual=a, num_frames=T)  # only the sum matters
        assert memory is None
        torch.testing.assert_close(out, swapped)
        attn.set_processor(MemoryTemporalAttnProcessor(num_features=16))  # same weights, other maths
        assert not torch.allclose(attn(h, archived_residual=a, present_residual=p, num_frames=T)[0], out, atol=1e-5)


def test_temporal_attention_mixes_frames_only_within_each_token():
    attn = _attention(SoftmaxTemporalAttnProcessor())
    h, a, p = _streams()
    with torch.no_grad():
        base, _ = attn(h, archived_residual=a, present_residual=p, num_frames=T)
        changed = h.clone()
        changed[1, 2] += 1.0  # video 0, frame 1, token 2
        out, _ = attn(changed, archived_residual=a, present_residual=p, num_frames=T)
    diff = (out - base).abs().sum(-1)  # (b f, s)
    assert diff[:T, 2].min() > 0  # every frame of video 0 at token 2 changes
    assert diff[:, [0, 1, 3, 4, 5]].max() == 0 and diff[T:].max() == 0  # nothing else


def test_full_history_baseline_state_grows_mta_state_constant():
    h, a, p = _streams()
    full = _attention(FullHistorySoftmaxAttnProcessor())
    mta = _attention(MemoryTemporalAttnProcessor(num_features=16))
    full_state = mta_state = None
    full_sizes, mta_sizes = [], []
    with torch.no_grad():
        for _ in range(3):
            _, full_state = full(h, archived_residual=a, present_residual=p, num_frames=T, memory=full_state)
            _, mta_state = mta(h, archived_residual=a, present_residual=p, num_frames=T, memory=mta_state)
            full_sizes.append(full_state.numel())
            mta_sizes.append(mta_state.numel())
    assert full_sizes == [full_sizes[0] * k for k in (1, 2, 3)]
    assert mta_sizes == [mta_sizes[0]] * 3


def test_bad_inputs():
    attn = _attention(MemoryTemporalAttnProcessor(num_features=16))
    h, a, p = _streams()
    with pytest.raises(McdmError, match="num_frames"):
        attn(h, archived_residual=a, present_residual=p, num_frames=3)
    with pytest.raises(McdmError, match="memory"):
        attn(h, archived_residual=a, present_residual=p, num_frames=T, memory=torch.zeros(5, CH))
    with pytest.raises(McdmError, match="alpha"):
        MemoryTemporalAttnProcessor(alpha=-0.1)
