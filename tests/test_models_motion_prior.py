"""Present-clip motion-prior diffusion model (Sec. 3.3, Eq. 3): causal mask, FiLM, loss, sampling, I/O."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from mcdm.errors import McdmError
from mcdm.models.loading import load_strict
from mcdm.models.motion_prior import (
    FiLM,
    MultimodalCausalBlock,
    PresentClipMotionPrior,
    frame_causal_mask,
)
from mcdm.train.builders import motion_prior_from_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, F_, A, E, LM = 2, 5, 12, 20, 24


TINY = dict(audio_dim=A, ref_dim=E, head_dim=6, lip_dim=4, expression_dim=5, landmark_dim=LM, dim=32,
            num_layers=2, num_heads=4, ff_mult=2, num_train_timesteps=100)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the zero inits (adaLN-Zero gates, output heads, FiLM) by random weights, so every block
    really mixes tokens; otherwise the blocks are identities and a leakage test could not fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def batch(seed: int = 0, landmarks: bool = False, frames: int = F_) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = dict(audio=torch.randn(B, frames, A, generator=g), ref_embedding=torch.randn(B, E, generator=g),
               head=torch.randn(B, frames, 6, generator=g), lip=torch.randn(B, frames, 4, generator=g),
               expression=torch.randn(B, frames, 5, generator=g))
    if landmarks:
        out["landmarks"] = torch.randn(B, frames, LM, generator=g)
    return out


def eps(model, b, t=50, landmarks=None):
    return model(b["head"], b["lip"], b["expression"], torch.full((B,), t), b["audio"], b["ref_embedding"], landmarks=landmarks)


def test_frame_causal_mask_pattern():
    idx = torch.tensor([-1, 0, 0, 1, 1])
    allowed = frame_causal_mask(idx) == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0],  # the timestep token sees only itself
        [1, 1, 1, 0, 0],  # frame 0 sees t and frame 0
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_multimodal_causal_block_has_no_future_leakage():
    torch.manual_seed(0)
    block = randomise(MultimodalCausalBlock(16, 2, 2))
    k, n_frames = 4, 6
    frame_index = torch.cat([torch.tensor([-1]), torch.arange(n_frames).repeat_interleave(k)])
    mask = frame_causal_mask(frame_index)
    x, cond = torch.randn(2, 1 + k * n_frames, 16), torch.randn(2, 16)
    y = block(x, cond, mask)
    x2 = x.clone()
    cut = 1 + k * 3  # tokens of frames 3.. changed
    x2[:, cut:] += torch.randn_like(x2[:, cut:])
    y2 = block(x2, cond, mask)
    assert torch.allclose(y[:, :cut], y2[:, :cut], atol=1e-6)  # past (and t) unchanged
    assert not torch.allclose(y[:, cut:], y2[:, cut:], atol=1e-3)
    # control: without the mask the same perturbation reaches the past, so the check above can fail
    y_open, y2_open = block(x, cond, torch.zeros_like(mask)), block(x2, cond, torch.zeros_like(mask))
    assert not torch.allclose(y_open[:, :cut], y2_open[:, :cut], atol=1e-3)


def test_whole_prior_is_causal_with_causal_temporal_blocks():
    model = randomise(PresentClipMotionPrior(**{**TINY, "audio_window": 1, "causal_temporal": True})).eval()
    b = batch()
    past = 2  # frames 0..2 must not see frames 3.. (audio: window of 1 looks one frame ahead)
    b2 = {k: v.clone() for k, v in b.items()}
    for key in ("head", "lip", "expression"):
        b2[key][:, past + 1:] += torch.randn_like(b2[key][:, past + 1:])
    b2["audio"][:, past + 2:] += torch.randn_like(b2["audio"][:, past + 2:])
    out, out2 = eps(model, b), eps(model, b2)
    for key in ("head", "lip", "expression"):
        assert torch.allclose(getattr(out, key)[:, : past + 1], getattr(out2, key)[:, : past + 1], atol=1e-5)
        assert not torch.allclose(getattr(out, key)[:, past + 1:], getattr(out2, key)[:, past + 1:], atol=1e-3)
    # the default (bidirectional temporal interaction) does let the future in: the check can fail
    open_model = randomise(PresentClipMotionPrior(**{**TINY, "audio_window": 1})).eval()
    assert not torch.allclose(eps(open_model, b).lip[:, : past + 1], eps(open_model, b2).lip[:, : past + 1], atol=1e-3)


def test_film_matches_closed_form_and_starts_as_identity():
    film = FiLM(3, 2)
    x = torch.randn(2, 4, 3)  # (B, F, d): audio tokens
    cond = torch.randn(2, 2)  # (B, d_c): the image token, replicated over the 4 frames
    assert torch.equal(film(x, cond[:, None].expand(-1, 4, -1)), x)  # zero init: identity
    w = np.arange(12, dtype=np.float32).reshape(6, 2) / 10 - 0.5
    bias = np.linspace(-1, 1, 6).astype(np.float32)
    with torch.no_grad():
        film.to_gamma_beta.weight.copy_(torch.from_numpy(w))
        film.to_gamma_beta.bias.copy_(torch.from_numpy(bias))
    with torch.no_grad():
        y = film(x, cond[:, None].expand(-1, 4, -1)).numpy()
    gb = cond.numpy() @ w.T + bias  # (B, 6)
    gamma, beta = 1 + gb[:, :3], gb[:, 3:]
    np.testing.assert_allclose(y, gamma[:, None] * x.numpy() + beta[:, None], rtol=1e-5, atol=1e-6)


def test_loss_decreases_on_tiny_synthetic_task():
    torch.manual_seed(0)
    model = PresentClipMotionPrior(**TINY)
    g = torch.Generator().manual_seed(1)
    # motion is a fixed function of the audio (lip) and of the reference (head, expression)
    audio, ref = torch.randn(8, F_, A, generator=g), torch.randn(8, E, generator=g)
    data = dict(audio=audio, ref_embedding=ref, lip=audio[..., :4], head=ref[:, None, :6].expand(-1, F_, -1),
                expression=torch.tanh(audio[..., 4:9] + ref[:, None, :5]))

    def eval_loss():
        with torch.no_grad():
            return float(np.mean([model.training_loss(data, torch.Generator().manual_seed(s)) for s in range(6)]))

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(40):
        loss = model.training_loss(data, torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_forward_backward_reaches_every_part():
    model = PresentClipMotionPrior(**{**TINY, "p_drop_landmarks": 0.0})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # adaLN-Zero + zero output heads: the first step only moves the output heads and the gates
    loss = model.training_loss(batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert model.get_parameter("lip_out.weight").grad.abs().sum() > 0
    assert model.causal_blocks[0].block.attn.to_q.weight.grad.abs().sum() == 0
    opt.step()
    for step in range(3):  # zero inits unlock layer by layer (FiLM's, then the image projection's)
        opt.zero_grad()
        model.training_loss(batch(step), torch.Generator().manual_seed(step)).backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if not n.startswith("landmark_in") and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not dead, dead
    opt.zero_grad()
    model.training_loss(batch(landmarks=True), torch.Generator().manual_seed(0)).backward()
    assert all(p.grad.abs().sum() > 0 for p in model.landmark_in.parameters())
    assert model.head_out.weight.grad.abs().sum() == 0  # landmarks kept: the head is a condition


def test_sample_shapes_and_determinism():
    model = randomise(PresentClipMotionPrior(**TINY)).eval()
    b = batch()

    def run(seed, **kw):
        return model.sample(b["audio"], b["ref_embedding"], num_inference_steps=4, generator=torch.Generator().manual_seed(seed), **kw)

    o1, o2, o3 = run(0), run(0), run(1)
    assert o1.head.shape == (B, F_, 6) and o1.lip.shape == (B, F_, 4) and o1.expression.shape == (B, F_, 5)
    for k in ("head", "lip", "expression"):
        assert torch.equal(getattr(o1, k), getattr(o2, k))
        assert not torch.allclose(getattr(o1, k), getattr(o3, k))
    # DDPM works as well (stochastic steps driven by the same generator)
    sched = DDPMScheduler(num_train_timesteps=100, prediction_type="epsilon", clip_sample=False)
    d1, d2 = run(0, scheduler=sched), run(0, scheduler=sched)
    assert torch.equal(d1.lip, d2.lip) and torch.isfinite(d1.lip).all()
    # with landmarks: the head is the driving video's, lip and expression are denoised
    lm, head = torch.randn(B, F_, LM), torch.randn(B, F_, 6)
    o = run(0, landmarks=lm, head=head)
    assert torch.equal(o.head, head) and o.lip.shape == (B, F_, 4)
    assert not torch.allclose(o.lip, o1.lip)  # the landmarks condition the result
    with pytest.raises(McdmError, match="head"):
        run(0, landmarks=lm)


def test_sampling_never_starts_at_the_degenerate_last_timestep_and_stays_bounded():
    """The cosine schedule's abar at t = T-1 is ~1e-9 (x0 = (z - sqrt(1 - abar) eps) / sqrt(abar) would
    amplify any epsilon error ~1e4-fold): DDIM starts at a "leading" timestep and clips x0, so even an
    untrained prior (random weights) gives tokens within PRIOR_X0_RANGE."""
    from diffusers import DDIMScheduler

    from mcdm.models.motion_prior import PRIOR_X0_RANGE

    model = randomise(PresentClipMotionPrior(**{**TINY, "num_train_timesteps": 1000}), seed=3).eval()
    sched = DDIMScheduler(**model._scheduler_kwargs())
    sched.set_timesteps(20)
    assert int(sched.timesteps[0]) < 999 and float(sched.alphas_cumprod[sched.timesteps[0]]) > 1e-3
    b = batch()
    out = model.sample(b["audio"], b["ref_embedding"], num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    for k in ("head", "lip", "expression"):
        assert getattr(out, k).abs().max() <= PRIOR_X0_RANGE + 1e-4


def test_present_clip_tokens_shape_and_dependence():
    model = randomise(PresentClipMotionPrior(**TINY))
    b = batch()
    f_pc = model.present_clip_tokens(b["head"], b["lip"], b["expression"])
    assert f_pc.shape == (B, F_, model.num_present_clip_tokens, TINY["dim"])
    f_pc2 = model.present_clip_tokens(b["head"], b["lip"] + 1, b["expression"])
    changed = (f_pc - f_pc2).abs().amax(dim=(0, 1, 3))
    assert changed[1] > 0 and changed[0] == 0 and changed[2] == 0  # only the lip token moved


def test_from_params_builds_the_configured_prior():
    from mcdm.config import Params

    m = Params().model
    prior = motion_prior_from_params(m, audio_dim=80, ref_dim=144, landmark_dim=512)
    cfg = prior.config
    assert (cfg.dim, cfg.num_layers, cfg.lip_dim, cfg.expression_dim, cfg.p_drop_landmarks) == (
        m.prior_dim, m.prior_layers, m.lip_dim, m.expression_dim, m.p_drop_landmarks)
    assert len(prior.causal_blocks) == len(prior.temporal_blocks) == m.prior_layers
    assert prior.noise_scheduler.config.num_train_timesteps == m.prior_train_timesteps


def test_save_load_round_trip_identical(tmp_path):
    model = randomise(PresentClipMotionPrior(**TINY)).eval()
    model.fit_condition_statistics(torch.randn(50, A) * 3 + 2, torch.randn(7, E))
    assert model.audio_mean.abs().sum() > 0
    model.save_pretrained(tmp_path / "prior")
    loaded = load_strict(PresentClipMotionPrior, tmp_path / "prior")
    assert loaded.config.num_train_timesteps == 100 and loaded.config.landmark_dim == LM
    b = batch(landmarks=True)
    for a_out, b_out in zip(eps(model, b, landmarks=b["landmarks"]).to_tuple(), eps(loaded, b, landmarks=b["landmarks"]).to_tuple()):
        assert torch.equal(a_out, b_out)
    s1 = model.sample(b["audio"], b["ref_embedding"], num_inference_steps=3, generator=torch.Generator().manual_seed(3))
    s2 = loaded.sample(b["audio"], b["ref_embedding"], num_inference_steps=3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1.lip, s2.lip)
    l1 = model.training_loss(b, torch.Generator().manual_seed(0))
    l2 = loaded.training_loss(b, torch.Generator().manual_seed(0))
    assert torch.equal(l1, l2)


def test_landmark_drop_probability_and_head_loss_mask():
    model = PresentClipMotionPrior(**{**TINY, "p_drop_landmarks": 0.3})
    kept = model.landmark_keep_mask(20000, generator=torch.Generator().manual_seed(0)).float().mean().item()
    assert abs(kept - 0.7) < 0.015  # 3 sigma of a binomial(20000, 0.7) is ~0.01
    model.register_to_config(p_drop_landmarks=0.0)
    assert model.landmark_keep_mask(500).all()
    model.register_to_config(p_drop_landmarks=1.0)
    assert not model.landmark_keep_mask(500).any()

    # landmarks always kept: the head is a condition, its target does not enter the loss
    randomise(model)
    model.register_to_config(p_drop_landmarks=0.0)
    b = batch(landmarks=True)
    b_other_head = {**b, "head": b["head"] + 5.0}
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(model.training_loss(b, g()), model.training_loss(b_other_head, g()))
        parts = model.training_losses(b, g())
        assert parts["landmark_kept"] == 1.0
        # landmarks always dropped: head is denoised and counted
        model.register_to_config(p_drop_landmarks=1.0)
        assert not torch.equal(model.training_loss(b, g()), model.training_loss(b_other_head, g()))
        assert model.training_losses(b, g())["landmark_kept"] == 0.0
