"""The denoiser's target and Min-SNR weights against their closed forms and diffusers' own maths."""
import pytest
import torch

from mcdm.models.diffusion_objective import denoising_mse, min_snr_weight, predicted_x0, training_target
from mcdm.models.schedulers import make_scheduler


@pytest.fixture(params=["epsilon", "v_prediction"])
def scheduler(request):
    return make_scheduler(request.param)


def _batch(shape=(3, 4, 2, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.tensor([0, 500, 999])


def test_target_is_eps_or_diffusers_velocity(scheduler):
    z0, eps, t = _batch()
    target = training_target(scheduler, z0, eps, t)
    if scheduler.config.prediction_type == "epsilon":
        assert torch.equal(target, eps)
    else:  # diffusers' get_velocity: sqrt(abar) eps - sqrt(1 - abar) z0
        torch.testing.assert_close(target, scheduler.get_velocity(z0, eps, t), rtol=1e-5, atol=1e-6)


def test_a_perfect_prediction_recovers_z0_and_has_zero_loss(scheduler):
    z0, eps, t = _batch()
    z_t = scheduler.add_noise(z0, eps, t)
    perfect = training_target(scheduler, z0, eps, t)
    torch.testing.assert_close(predicted_x0(scheduler, z_t, perfect, t), z0, rtol=1e-4, atol=2e-4)
    assert float(denoising_mse(scheduler, perfect, z0, eps, t, min_snr_gamma=5.0)) < 1e-10


def test_x0_matches_the_ddim_step_of_diffusers(scheduler):
    """predicted_x0 is the x0 diffusers' DDIM computes from the same output (pred_original_sample)."""
    from diffusers import DDIMScheduler

    z0, eps, _ = _batch((2, 4, 8, 8))
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(10)
    t = ddim.timesteps[3]
    z_t = scheduler.add_noise(z0, eps, t.repeat(2))
    out = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    ref = ddim.step(out, t, z_t).pred_original_sample
    torch.testing.assert_close(predicted_x0(scheduler, z_t, out, t.repeat(2)), ref, rtol=1e-4, atol=1e-4)


def test_min_snr_weights_closed_form(scheduler):
    t = torch.tensor([10, 300, 900])
    abar = scheduler.alphas_cumprod[t]
    snr = abar / (1 - abar)
    w = min_snr_weight(scheduler, t, 5.0)
    expect = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(w, expect.float())


def test_unknown_prediction_type_is_refused():
    sch = make_scheduler()
    sch.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        training_target(sch, *_batch())
