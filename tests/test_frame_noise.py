"""The mixed noise model (PYoCo): unit variance per element, correlation rho between the frames of a
clip, the same draw as independent noise at rho = 0; training and generation both use it."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from mcdm.errors import McdmError
from mcdm.models.frame_noise import frame_correlated_noise
from mcdm.models.schedulers import make_scheduler
from mcdm.train.stages.losses import diffusion_mse


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8])
def test_unit_variance_and_frame_correlation_rho(rho):
    eps = frame_correlated_noise((64, 4, 3, 16, 16), rho, generator=torch.Generator().manual_seed(0))
    assert eps.shape == (64, 4, 3, 16, 16)
    assert float(eps.var()) == pytest.approx(1.0, abs=0.01)
    assert float(eps.mean()) == pytest.approx(0.0, abs=0.01)
    frames = eps.permute(2, 0, 1, 3, 4).reshape(3, -1).numpy()  # (F, everything else)
    corr = np.corrcoef(frames)
    off_diagonal = corr[~np.eye(3, dtype=bool)]
    np.testing.assert_allclose(off_diagonal, rho, atol=0.01)


def test_rho_zero_is_the_independent_draw_and_rho_one_repeats_one_field():
    shape = (2, 4, 5, 8, 8)
    independent = randn_tensor(shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(frame_correlated_noise(shape, 0.0, generator=torch.Generator().manual_seed(3)),
                               independent, rtol=0, atol=0)
    same = frame_correlated_noise(shape, 1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(same, same[:, :, :1].expand(shape), rtol=0, atol=0)
    # another frame axis: frames along dim 1 (B, F, C, h, w)
    other = frame_correlated_noise((2, 5, 4, 8, 8), 1.0, generator=torch.Generator().manual_seed(3), frame_dim=1)
    torch.testing.assert_close(other, other[:, :1].expand(2, 5, 4, 8, 8), rtol=0, atol=0)


@pytest.mark.parametrize("rho", [-0.1, 1.5])
def test_rho_outside_unit_interval_is_refused(rho):
    with pytest.raises(McdmError, match=r"frame noise correlation must be in \[0, 1\]"):
        frame_correlated_noise((1, 1, 2, 2, 2), rho)


class _Capture(torch.nn.Module):
    """Stands in for the denoiser: records its noisy input, predicts zeros."""

    def forward(self, z_t, t, memory_state=None, **cond):
        self.z_t = z_t
        return SimpleNamespace(sample=torch.zeros_like(z_t), memory_state=None)


@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_training_noise_follows_rho(rho):
    """The stages' loss noises a clip's frames with the mixed model: from z_0 = 0 at rho = 1 every
    frame of z_t is the same field, at rho = 0 none is."""
    torch.manual_seed(0)
    capture = _Capture()
    z0 = torch.zeros(2, 4, 3, 8, 8)
    diffusion_mse(capture, make_scheduler("v_prediction"), z0, torch.tensor([500, 900]), rho=rho)
    z_t = capture.z_t
    same = torch.allclose(z_t[:, :, 1:], z_t[:, :, :1].expand_as(z_t[:, :, 1:]))
    assert same == (rho == 1.0)
