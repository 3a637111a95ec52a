"""Archived-clip motion prior: patchify + frame-aligned attention (paper Eq. 1-2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from mcdm.errors import McdmError
from mcdm.models.archived_prior import ArchivedClipPrior, sincos_2d

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, A, C, H, W = 2, 3, 4, 8, 8
D, N_QUERIES, PATCH = 32, 5, 2


@pytest.fixture
def prior() -> ArchivedClipPrior:
    torch.manual_seed(0)
    return ArchivedClipPrior(latent_channels=C, prior_dim=D, patch_size=PATCH, num_queries=N_QUERIES).eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g), torch.randn(B, A, C, H, W, generator=g)


def _patchify_numpy(conv: torch.nn.Conv2d, latent: np.ndarray) -> np.ndarray:
    """Conv with kernel = stride = p as an explicit linear map on non-overlapping patches."""
    w, b = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    n, c, h, wd = latent.shape
    patches = latent.reshape(n, c, h // PATCH, PATCH, wd // PATCH, PATCH)
    tokens = np.einsum("ncyuxv,dcuv->nyxd", patches, w) + b
    pos = sincos_2d(h // PATCH, wd // PATCH, D, torch.zeros(1)).double().numpy()
    return tokens.reshape(n, -1, w.shape[0]) + pos


def test_output_shape_and_eq_1_2_against_numpy(prior):
    ref, arch = _inputs()
    with torch.no_grad():
        out = prior(ref, arch)
    assert out.shape == (B, A, N_QUERIES, D)

    # independent reference: Eq. 1 K_i = F_x W_K, V_i = F_a^i W_V; Eq. 2 Softmax(Q K_i^T / sqrt(d)) V_i
    attn = prior.frame_aligned_attention
    wq, wk, wv = (m.weight.detach().double().numpy() for m in (attn.to_q, attn.to_k, attn.to_v))
    wo, bo = attn.to_out[0].weight.detach().double().numpy(), attn.to_out[0].bias.detach().double().numpy()
    f_x = _patchify_numpy(prior.patchify_reference.proj, ref.double().numpy())  # (B, m, d)
    queries = prior.queries.detach().double().numpy() @ wq.T
    for b in range(B):
        for i in range(A):
            f_a = _patchify_numpy(prior.patchify_archived.proj, arch[b, i : i + 1].double().numpy())[0]
            k_i, v_i = f_x[b] @ wk.T, f_a @ wv.T
            expected = softmax(queries @ k_i.T / np.sqrt(D), axis=-1) @ v_i @ wo.T + bo
            np.testing.assert_allclose(out[b, i].double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_frame_i_depends_only_on_reference_and_archived_frame_i(prior):
    ref, arch = _inputs()
    with torch.no_grad():
        base = prior(ref, arch)
        for j in range(A):
            changed = arch.clone()
            changed[:, j] += torch.randn_like(changed[:, j])
            out = prior(ref, changed)
            for i in range(A):
                if i == j:
                    assert not torch.allclose(out[:, i], base[:, i], atol=1e-4)
                else:
                    torch.testing.assert_close(out[:, i], base[:, i])
        # the reference (keys) reaches every frame
        out = prior(ref + torch.randn_like(ref), arch)
        for i in range(A):
            assert not torch.allclose(out[:, i], base[:, i], atol=1e-4)


def test_wo_fa_uses_reference_only():
    torch.manual_seed(0)
    prior = ArchivedClipPrior(latent_channels=C, prior_dim=D, patch_size=PATCH, num_queries=N_QUERIES,
                              use_archived_frames=False).eval()
    ref, arch = _inputs()
    with torch.no_grad():
        out = prior(ref, None)
        assert out.shape == (B, 1, N_QUERIES, D)
        torch.testing.assert_close(prior(ref, arch), out)  # archived frames are ignored


def test_backward_reaches_every_parameter_and_round_trip(prior, tmp_path):
    ref, arch = _inputs()
    prior.train()
    prior(ref, arch).square().mean().backward()
    for name, param in prior.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    prior.save_pretrained(tmp_path)
    loaded = ArchivedClipPrior.from_pretrained(tmp_path).eval()
    prior.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ref, arch), prior(ref, arch), rtol=0, atol=0)


def test_bad_shapes_are_one_line_errors(prior):
    ref, arch = _inputs()
    with pytest.raises(McdmError, match="archived_latents"):
        prior(ref, None)
    with pytest.raises(McdmError, match="archived_latents"):
        prior(ref, arch[:, 0])
    with pytest.raises(McdmError, match="patch_size"):
        prior(ref[..., :7], arch[..., :7])


def _trained_like_reference_tokens(dim: int = D):
    from mcdm.models.reference_tokens import ReferenceTokens

    torch.manual_seed(3)
    tokens = ReferenceTokens(latent_channels=C, sample_size=H, patch_size=PATCH, dim=dim).eval()
    with torch.no_grad():  # not the init values, so a wrong copy cannot pass
        tokens.pos_embed.normal_(0, 0.3)
        tokens.norm.weight.normal_(1, 0.2)
        tokens.norm.bias.normal_(0, 0.2)
    return tokens


def test_warm_start_reproduces_the_base_reference_tokens_of_each_archived_frame(tmp_path):
    ref_tokens = _trained_like_reference_tokens()
    m = (H // PATCH) ** 2
    prior = ArchivedClipPrior(latent_channels=C, prior_dim=D, patch_size=PATCH, num_queries=m)
    prior.warm_start(ref_tokens, side=H)
    prior.eval()
    ref, arch = _inputs()
    with torch.no_grad():
        out = prior(ref, arch)
        expected = torch.stack([ref_tokens(arch[:, i]) for i in range(A)], dim=1)
    assert out.shape == expected.shape == (B, A, m, D)
    # the softmax leaks (1 + 3 exp(-8))^-2 - 1 = 0.2% onto the other positions of a query's row and column
    err = (out - expected).abs()
    assert err.max() < 0.02 and err.mean() < 2e-3, (err.max(), err.mean())
    assert expected.abs().mean() > 0.5  # not vacuous
    # the keys (reference) start without content but are trainable: a step moves the output
    assert prior.config.num_positions == m and prior.config.output_norm
    prior.save_pretrained(tmp_path)
    loaded = ArchivedClipPrior.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ref, arch), out, rtol=0, atol=0)


def test_warm_start_refuses_shapes_that_cannot_match():
    ref_tokens = _trained_like_reference_tokens()
    prior = ArchivedClipPrior(latent_channels=C, prior_dim=D, patch_size=PATCH, num_queries=N_QUERIES)
    with pytest.raises(McdmError, match=f"num_queries {N_QUERIES} vs 16 reference tokens"):
        prior.warm_start(ref_tokens, side=H)
    wide = ArchivedClipPrior(latent_channels=C, prior_dim=2 * D, patch_size=PATCH, num_queries=16)
    with pytest.raises(McdmError, match="dim 32.*vs prior \\(dim 64"):
        wide.warm_start(ref_tokens, side=H)
