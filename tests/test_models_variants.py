"""The assembled denoiser per variant (Tables 4-5), the builder from params, and the per-stage freeze API."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from mcdm.config import VARIANTS, Params
from mcdm.errors import McdmError
from mcdm.models.denoiser import STAGE_GROUPS, MCDMDenoiser
from mcdm.models.variants import QFormerPrior, ReferenceUNetPrior
from mcdm.train.builders import build_denoiser, denoiser_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, F, A, H, W = 2, 4, 4, 8, 8


def _params(variant: str = "full", **model) -> Params:
    return Params(variant=variant, model={"archived_frames": A, **model})


def _inputs(variant: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        sample=torch.randn(B, 4, F, H, W, generator=g),
        timestep=torch.tensor([5, 900]),
        ref_latent=torch.randn(B, 4, H, W, generator=g),
        archived_latents=torch.randn(B, A, 4, H, W, generator=g),
    )
    if variant == "wo_fpc":
        inputs["audio_tokens"] = torch.randn(B, F, 5, 80, generator=g)
    else:
        inputs["present_tokens"] = torch.randn(B, F, 6, 64, generator=g)
    return inputs


def _wake_new_layers(model: MCDMDenoiser) -> None:
    """Give the zero-initialised attentions weights, as after stage 3."""
    with torch.no_grad():
        for block in model.unet.transformer_blocks():
            for attn in (block.attn_present, block.attn_temporal):
                attn.to_out[0].weight.normal_(0, 0.2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_builds_runs_backward_and_round_trips(variant, tmp_path):
    torch.manual_seed(0)
    model = build_denoiser(_params(variant))
    assert model.config.model_variant == variant
    _wake_new_layers(model)
    inputs = _inputs(variant)
    out = model(**inputs)
    assert out.sample.shape == (B, 4, F, H, W)
    assert (out.memory_state is None) == (variant == "wo_mta")
    out.sample.square().mean().backward()
    # every parameter gets a gradient: nothing built is dead
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]

    model.save_pretrained(tmp_path)
    loaded = MCDMDenoiser.from_pretrained(tmp_path)
    model.eval(), loaded.eval()
    with torch.no_grad():
        memory = model(**_inputs(variant, seed=1)).memory_state
        a = model(**inputs, memory_state=memory)
        b = loaded(**inputs, memory_state=memory)
    torch.testing.assert_close(b.sample, a.sample, rtol=0, atol=0)
    assert type(loaded.archived_prior) is type(model.archived_prior)
    assert type(loaded.unet.temporal_processor) is type(model.unet.temporal_processor)


def test_variant_structure():
    built = {v: build_denoiser(_params(v)) for v in ("full", "wo_fpc", "wo_mta", "b1", "b2")}
    assert built["full"].unet.temporal_processor.kind == "mta"
    assert built["wo_mta"].unet.temporal_processor.kind == "softmax"
    block = built["wo_fpc"].unet.transformer_blocks()[0]
    assert block.attn_present.to_k.in_features == 80  # audio attention reads audio features
    assert built["full"].unet.transformer_blocks()[0].attn_present.to_k.in_features == 64
    assert isinstance(built["b1"].archived_prior, QFormerPrior)
    assert isinstance(built["b2"].archived_prior, ReferenceUNetPrior)
    # b2's reference UNet starts as a copy of the denoiser's down path
    ref_sd, unet_sd = built["b2"].archived_prior.state_dict(), built["b2"].unet.state_dict()
    shared = [k for k in ref_sd if not k.startswith("level_proj.")]
    assert shared and all(torch.equal(ref_sd[k], unet_sd[k]) for k in shared)


def test_what_each_variant_reads():
    torch.manual_seed(0)
    inputs = _inputs("full")
    other_archive = dict(inputs, archived_latents=torch.randn(B, A, 4, H, W))
    with torch.no_grad():
        for variant, uses_archive in (("full", True), ("wo_fa", False), ("b1", True), ("b2", False)):
            model = build_denoiser(_params(variant)).eval()
            same = torch.allclose(model(**inputs).sample, model(**other_archive).sample)
            assert same != uses_archive, variant
    model = build_denoiser(_params("wo_fpc"))
    with pytest.raises(McdmError, match="present_tokens"):
        model(**_inputs("full"))
    with pytest.raises(McdmError, match="audio_tokens"):
        build_denoiser(_params("full"))(**_inputs("wo_fpc"))
    with pytest.raises(McdmError, match="archived frames"):
        build_denoiser(_params("full"))(**dict(inputs, archived_latents=inputs["archived_latents"][:, :2]))


def test_qformer_mixes_all_archived_frames_jointly():
    torch.manual_seed(0)
    qformer = QFormerPrior(prior_dim=32, num_queries=3, archived_frames=A, num_layers=2, heads=4).eval()
    ref, arch = torch.randn(B, 4, H, W), torch.randn(B, A, 4, H, W)
    with torch.no_grad():
        base = qformer(ref, arch)
        changed = arch.clone()
        changed[:, 0] += 1.0
        out = qformer(ref, changed)
    assert base.shape == (B, A, 3, 32)
    assert all((out[:, i] - base[:, i]).abs().amax() > 1e-5 for i in range(A))  # unlike frame-aligned attention


def test_precomputed_archived_tokens_match():
    torch.manual_seed(0)
    model = build_denoiser(_params("full")).eval()
    inputs = _inputs("full")
    with torch.no_grad():
        tokens = model.encode_archived(inputs["ref_latent"], inputs["archived_latents"])
        direct = model(**inputs).sample
        cached = model(**{**inputs, "ref_latent": None, "archived_latents": None}, archived_tokens=tokens).sample
    assert tokens.shape == (B, A * model.config.num_queries, 64)
    torch.testing.assert_close(cached, direct, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- stages


def test_freeze_for_stage_matches_decisions():
    model = build_denoiser(_params("full"))
    groups = {name: model.parameter_group(name) for name, _ in model.named_parameters()}
    assert set(groups.values()) == {"archived_prior", "archived_attention", "spatial", "present_attention",
                                    "temporal_attention"}
    stage1 = set(model.trainable_parameter_names(1))
    assert any(n.startswith("archived_prior.patchify_reference") for n in stage1)
    assert "archived_prior.queries" in stage1
    assert any(".attn_archived.to_k" in n for n in stage1) and any(".resnets.0.conv1" in n for n in stage1)
    assert any(".attn1." in n for n in stage1) and any(".ff." in n for n in stage1)
    assert not any(".attn_present." in n or ".attn_temporal." in n for n in stage1)
    assert model.trainable_parameter_names(2) == []
    stage3 = set(model.trainable_parameter_names(3))
    assert stage3 and all(".attn_present." in n or ".attn_temporal." in n for n in stage3)
    assert stage1 | stage3 == set(groups) and not stage1 & stage3

    _wake_new_layers(model)
    trainable = model.freeze_for_stage(3)
    assert {id(p) for p in trainable} == {id(p) for p in model.trainable_parameters(3)}
    model(**_inputs("full")).sample.square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in stage3), name
    with pytest.raises(McdmError, match="stage"):
        model.freeze_for_stage(4)
    assert STAGE_GROUPS[2] == ()


def test_alpha_is_config_and_can_be_changed(tmp_path):
    model = build_denoiser(Params(alpha=0.3, model={"archived_frames": A}))
    assert model.unet.temporal_processor.alpha == 0.3
    model.save_pretrained(tmp_path)
    assert MCDMDenoiser.from_pretrained(tmp_path).unet.temporal_processor.alpha == 0.3
    assert MCDMDenoiser.from_pretrained(tmp_path, alpha=0.7).unet.temporal_processor.alpha == 0.7
    model.set_alpha(0.9)
    assert model.config.alpha == 0.9 and model.unet.config.alpha == 0.9
    assert model.unet.temporal_processor.alpha == 0.9


# ---------------------------------------------------------------------------------------------- SD weights


def _tiny_sd(block_out_channels=(32, 64)) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=block_out_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=64, attention_head_dim=8,
    ).eval()


@pytest.mark.parametrize("variant", ["full", "b2"])
def test_build_from_base_unet_loads_its_weights(variant):
    sd = _tiny_sd()
    model = build_denoiser(_params(variant), unet2d=sd)
    ours = model.unet.state_dict()
    for key, value in sd.state_dict().items():
        assert torch.equal(ours[key.replace(".attn2.", ".attn_archived.")], value), key
    if variant == "b2":
        assert torch.equal(model.archived_prior.conv_in.weight, sd.conv_in.weight)
    inputs = _inputs(variant)
    with torch.no_grad():
        tokens = model.encode_archived(inputs["ref_latent"], inputs["archived_latents"])
        if variant == "full":  # identity at start: the SD UNet with F_ac as its encoder states, frame by frame
            x = inputs["sample"].permute(0, 2, 1, 3, 4).reshape(B * F, 4, H, W)
            expected = sd(x, inputs["timestep"].repeat_interleave(F), tokens.repeat_interleave(F, 0)).sample
            got = model(**inputs).sample.permute(0, 2, 1, 3, 4).reshape(B * F, 4, H, W)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_base_unet_that_disagrees_with_params_is_named():
    with pytest.raises(McdmError, match="block_out_channels"):
        build_denoiser(_params("full"), unet2d=_tiny_sd((32, 96)))
    with pytest.raises(McdmError, match="prior_dim"):
        build_denoiser(_params("full", prior_dim=32), unet2d=_tiny_sd())


def test_params_map_to_config():
    cfg = denoiser_config(Params(variant="b1", alpha=0.5, model={"mta_features": 16, "audio_dim": 768}))
    assert cfg["model_variant"] == "b1" and cfg["alpha"] == 0.5 and cfg["mta_features"] == 16
    assert cfg["audio_dim"] == 768 and cfg["down_block_types"] == ("CrossAttnDownBlock2D",) * 2
    with pytest.raises(McdmError, match="down_block_types"):
        build_denoiser(_params("full", down_block_types=["CrossAttnDownBlock2D"]))
