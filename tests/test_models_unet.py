"""The four-attention denoising UNet: SD weights, identity at init, frame folding, streaming memory."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from mcdm.errors import McdmError
from mcdm.models.temporal_attention import FullHistorySoftmaxAttnProcessor, detach_memory
from mcdm.models.unet import MCDMUNet, map_unet2d_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, F, H, W = 2, 4, 8, 8
D_ARCH, D_PRES = 32, 24
TINY_SD = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=D_ARCH, attention_head_dim=4, norm_num_groups=32,
)
SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


@pytest.fixture(scope="module")
def sd_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SD).eval()
    with torch.no_grad():  # random (non-zero) biases everywhere, so a wrong key map cannot go unnoticed
        for name, p in unet.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return unet


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(B, 4, F, H, W, generator=g),
        timestep=torch.tensor([10, 700]),
        archived_tokens=torch.randn(B, 12, D_ARCH, generator=g),
        present_tokens=torch.randn(B, F, 3, D_PRES, generator=g),
    )


def _per_frame_sd(unet, inputs) -> torch.Tensor:
    """The plain UNet2DConditionModel run frame by frame, with the archived tokens as encoder states."""
    x = inputs["sample"].permute(0, 2, 1, 3, 4).reshape(B * F, 4, H, W)
    out = unet(x, inputs["timestep"].repeat_interleave(F), inputs["archived_tokens"].repeat_interleave(F, 0)).sample
    return out.reshape(B, F, 4, H, W).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("temporal", ["mta", "softmax"])
def test_zero_initialised_new_attentions_reproduce_the_sd_unet(sd_unet, temporal):
    model = MCDMUNet.from_unet2d(sd_unet, present_attention_dim=D_PRES, temporal_attention=temporal).eval()
    inputs = _inputs()
    with torch.no_grad():
        out = model(**inputs)
        expected = _per_frame_sd(sd_unet, inputs)
    assert out.sample.shape == (B, 4, F, H, W)
    torch.testing.assert_close(out.sample, expected, rtol=1e-5, atol=1e-5)
    assert (out.memory_state is not None) == (temporal == "mta")

    # not vacuous: once the new attentions have weights, the present tokens and the other frames matter
    with torch.no_grad():
        for block in model.transformer_blocks():
            for attn in (block.attn_present, block.attn_temporal):
                attn.to_out[0].weight.normal_(0, 0.2)
        changed = model(**inputs).sample
        other_present = model(**{**inputs, "present_tokens": torch.randn(B, F, 3, D_PRES)}).sample
    assert not torch.allclose(changed, expected, atol=1e-4)
    assert not torch.allclose(other_present, changed, atol=1e-4)


def test_from_unet2d_copies_attn2_into_archived_attention(sd_unet):
    model = MCDMUNet.from_unet2d(sd_unet, present_attention_dim=D_PRES)
    ours = model.state_dict()
    for key, value in sd_unet.state_dict().items():
        torch.testing.assert_close(ours[key.replace(".attn2.", ".attn_archived.")], value, rtol=0, atol=0)
    new = [k for k in ours if ".attn_present." in k or ".attn_temporal." in k]
    assert len(ours) == len(sd_unet.state_dict()) + len(new)
    assert all(ours[k].abs().sum() == 0 for k in new if "to_out.0" in k)  # identity at start


def test_from_unet2d_refuses_to_drop_or_misplace_weights(sd_unet):
    source = dict(sd_unet.state_dict())
    target = MCDMUNet.from_unet2d(sd_unet, present_attention_dim=D_PRES).state_dict()
    with pytest.raises(McdmError, match="extra_head.weight"):
        map_unet2d_state_dict({**source, "extra_head.weight": torch.zeros(1)}, target)
    bad = {**source, "conv_in.weight": torch.zeros(32, 4, 1, 1)}
    with pytest.raises(McdmError, match="conv_in.weight"):
        map_unet2d_state_dict(bad, target)
    missing = {k: v for k, v in source.items() if k != "conv_out.bias"}
    with pytest.raises(McdmError, match="conv_out.bias"):
        map_unet2d_state_dict(missing, target)
    with pytest.raises(McdmError, match="class_embed_type"):
        MCDMUNet.config_from_unet2d({**sd_unet.config, "class_embed_type": "timestep"})


def test_sd15_shaped_unet_maps_every_key():
    """Paper scale, on the meta device (shapes only): SD-1.5's UNet loads into MCDMUNet unchanged."""
    with torch.device("meta"):
        sd = UNet2DConditionModel(**SD15)
        model = MCDMUNet(**MCDMUNet.config_from_unet2d(sd.config), present_attention_dim=768)
    mapped = map_unet2d_state_dict(sd.state_dict(), model.state_dict())
    assert len(mapped) == len(sd.state_dict()) == 686
    assert model.config.num_attention_heads == 8 and model.config.cross_attention_dim == 768


def test_frames_are_independent_until_temporal_attention_learns(sd_unet):
    model = MCDMUNet.from_unet2d(sd_unet, present_attention_dim=D_PRES).eval()
    inputs = _inputs()
    changed = dict(inputs, sample=inputs["sample"].clone())
    changed["sample"][:, :, 2] += 1.0
    with torch.no_grad():
        base, out = model(**inputs).sample, model(**changed).sample
        torch.testing.assert_close(out[:, :, [0, 1, 3]], base[:, :, [0, 1, 3]])  # spatial layers: per frame
        for block in model.transformer_blocks():
            block.attn_temporal.to_out[0].weight.normal_(0, 0.2)
        base, out = model(**inputs).sample, model(**changed).sample
    assert (out[:, :, [0, 1, 3]] - base[:, :, [0, 1, 3]]).abs().amax() > 1e-4  # temporal attention mixes frames


def test_streaming_memory_is_constant_size_and_carried(sd_unet):
    model = MCDMUNet.from_unet2d(sd_unet, present_attention_dim=D_PRES, alpha=0.5)
    with torch.no_grad():
        for block in model.transformer_blocks():
            block.attn_temporal.to_out[0].weight.normal_(0, 0.2)
    memory, sizes = None, []
    for clip in range(3):
        out = model(**_inputs(seed=clip), memory_state=memory)
        sizes.append(sum(v.numel() for v in out.memory_state.values()))
        if clip == 1:  # stage 3: backprop through one clip with the previous memory carried, detached
            out.sample.square().mean().backward()
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        memory = detach_memory(out.memory_state)
    assert sizes == [sizes[0]] * 3
    assert {k: v.shape for k, v in memory.items()} == {
        "down_blocks.0.attentions.0.transformer_blocks.0": (B, H * W, 32),
        "mid_block.attentions.0.transformer_blocks.0": (B, H * W // 4, 64),
        "up_blocks.1.attentions.0.transformer_blocks.0": (B, H * W, 32),
        "up_blocks.1.attentions.1.transformer_blocks.0": (B, H * W, 32),
    }
    with torch.no_grad():
        first = model(**_inputs(seed=5)).sample
        carried = model(**_inputs(seed=5), memory_state=memory).sample
    assert not torch.allclose(first, carried, atol=1e-5)

    # the full-history softmax baseline (benchmarks only) keeps every frame: its state grows
    model.set_temporal_processor(FullHistorySoftmaxAttnProcessor())
    history, sizes = None, []
    with torch.no_grad():
        for clip in range(3):
            history = model(**_inputs(seed=clip), memory_state=history).memory_state
            sizes.append(sum(v.numel() for v in history.values()))
    assert sizes == [sizes[0] * k for k in (1, 2, 3)]


def test_gradient_checkpointing_gives_the_same_gradients(sd_unet):
    torch.manual_seed(0)
    model = MCDMUNet.from_unet2d(sd_unet, present_attention_dim=D_PRES)
    with torch.no_grad():
        for block in model.transformer_blocks():
            block.attn_temporal.to_out[0].weight.normal_(0, 0.2)
    inputs = _inputs()
    model(**inputs).sample.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    out = model(**inputs)
    out.sample.square().mean().backward()
    assert out.memory_state is not None
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_landmark_residual_and_input_errors(sd_unet):
    model = MCDMUNet.from_unet2d(sd_unet, present_attention_dim=D_PRES).eval()
    inputs = _inputs()
    with torch.no_grad():
        base = model(**inputs).sample
        guided = model(**inputs, conv_in_residual=torch.randn(B, 32, F, H, W)).sample
        no_present = model(**{**inputs, "present_tokens": None}).sample
    assert not torch.allclose(base, guided)
    torch.testing.assert_close(no_present, base)  # zero-initialised present attention: skipped = identity
    with pytest.raises(McdmError, match="sample"):
        model(inputs["sample"][:, :, 0], 1, inputs["archived_tokens"])
    with pytest.raises(McdmError, match="present_tokens"):
        model(**{**inputs, "present_tokens": inputs["present_tokens"][:, :2]})
    with pytest.raises(McdmError, match="conv_in_residual"):
        model(**inputs, conv_in_residual=torch.randn(B, 8, F, H, W))
    with pytest.raises(McdmError, match="timestep"):
        model(**{**inputs, "timestep": torch.tensor([1, 2, 3])})
    with pytest.raises(McdmError, match="memory_state"):
        model(**inputs, memory_state={"down_blocks.9.attentions.0": torch.zeros(B, H * W, 32)})


def test_warm_started_denoiser_reads_what_the_base_unet_was_pretrained_on(sd_unet):
    """Stage 1's start (model.archived_prior_init: reference_tokens): every archived frame is the
    reference at the first clip, and the denoiser then predicts what the base UNet predicts for each
    frame given the base reference tokens of the reference (decisions.md #1's pretraining condition)."""
    from mcdm.models.denoiser import MCDMDenoiser
    from mcdm.models.reference_tokens import ReferenceTokens

    torch.manual_seed(2)
    ref_tokens = ReferenceTokens(latent_channels=4, sample_size=H, patch_size=2, dim=D_ARCH).eval()
    with torch.no_grad():
        ref_tokens.pos_embed.normal_(0, 0.3)
        ref_tokens.norm.bias.normal_(0, 0.2)
    a, m = 3, (H // 2) ** 2
    denoiser = MCDMDenoiser.from_unet2d(sd_unet, num_queries=m, archived_frames=a, patch_size=2).eval()
    denoiser.warm_start_archived_prior(ref_tokens, side=H)
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(B, 4, H, W, generator=g)
    inputs = dict(sample=torch.randn(B, 4, F, H, W, generator=g), timestep=torch.tensor([10, 700]))
    with torch.no_grad():
        out = denoiser(**inputs, ref_latent=ref, archived_latents=ref[:, None].repeat(1, a, 1, 1, 1)).sample
        expected = _per_frame_sd(sd_unet, {**inputs, "archived_tokens": ref_tokens(ref)})
        random_prior = MCDMDenoiser.from_unet2d(sd_unet, num_queries=m, archived_frames=a, patch_size=2).eval()
        unrelated = random_prior(**inputs, ref_latent=ref, archived_latents=ref[:, None].repeat(1, a, 1, 1, 1)).sample
    err = (out - expected).abs().max()
    assert err < 0.02 * expected.abs().max(), err
    assert (unrelated - expected).abs().max() > 10 * err  # a random prior does not
    assert denoiser.config.prior_positions == m and denoiser.config.prior_output_norm
