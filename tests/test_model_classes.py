"""Every model class of ``mcdm.models`` passes ``ModelTesterMixin`` (tests/model_tester.py): output shape,
determinism, the safetensors save / ``load_strict`` round trip, and gradient flow to exactly the parameters
it (or its training stage) trains. Tiny configs; ``test_every_model_class_has_a_tester`` fails when a new
``ModelMixin`` class appears under ``mcdm.models`` without a tester here."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
from diffusers.models.modeling_utils import ModelMixin

pytest.register_assert_rewrite("model_tester")  # detailed assertion messages from the mixin's checks
from model_tester import ModelTesterMixin, wake_zero_initialised  # noqa: E402

import mcdm.models
from mcdm.models.archived_prior import ArchivedClipPrior
from mcdm.models.audio_tokens import AudioWindowTokens
from mcdm.models.denoiser import STAGE_GROUPS, MCDMDenoiser
from mcdm.models.landmark_guider import LandmarkGuider
from mcdm.models.motion_encoders import ExpressionEncoder, HeadPoseEncoder, LipAudioEncoder, LipEncoder
from mcdm.models.motion_prior import PresentClipMotionPrior
from mcdm.models.reference_tokens import ReferenceTokens
from mcdm.models.sync.syncnet import OfficialSyncNet, SyncNet
from mcdm.models.unet import MCDMUNet
from mcdm.models.variants import QFormerPrior, ReferenceUNetPrior

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, F, C, H, W = 2, 3, 4, 8, 8  # batch, frames, latent channels, latent side
D = 16  # token width (prior_dim / cross-attention width)
A = 2  # archived frames
UNET_TINY = dict(
    block_out_channels=(16, 32), layers_per_block=1, num_attention_heads=2, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    mta_features=8,
)
# the zero-initialised output projections of the new attentions (identity at init, unet_blocks._zero_output)
NEW_ATTENTION_OUTPUTS = (".attn_present.to_out.0.", ".attn_temporal.to_out.0.")


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


# =============================================================================================
# denoising UNet and the assembled denoiser
# =============================================================================================
class TestMCDMUNet(ModelTesterMixin):
    model_class = MCDMUNet
    expected_shape = (B, C, F, H, W)

    def init_kwargs(self):
        return dict(in_channels=C, out_channels=C, cross_attention_dim=D, present_attention_dim=12, **UNET_TINY)

    def inputs(self, g):
        return dict(sample=randn(g, B, C, F, H, W), timestep=torch.tensor([5, 900]),
                    archived_tokens=randn(g, B, 6, D), present_tokens=randn(g, B, F, 3, 12))

    def forward(self, model, inputs):
        return model(**inputs).sample

    def prepare(self, model, **case):
        wake_zero_initialised(model, *NEW_ATTENTION_OUTPUTS)


class DenoiserTester(ModelTesterMixin):
    """``MCDMDenoiser`` of one ``variant``; the gradient test runs per training stage (``freeze_for_stage``)."""

    model_class = MCDMDenoiser
    variant = "full"
    expected_shape = (B, C, F, H, W)

    def init_kwargs(self):
        return dict(model_variant=self.variant, latent_channels=C, prior_dim=D, archived_frames=A, num_queries=2,
                    patch_size=4, frame_attention_heads=1, qformer_layers=1, qformer_heads=2, audio_dim=12,
                    **UNET_TINY)

    def inputs(self, g):
        out = dict(sample=randn(g, B, C, F, H, W), timestep=torch.tensor([5, 900]),
                   ref_latent=randn(g, B, C, H, W), archived_latents=randn(g, B, A, C, H, W))
        if self.variant == "wo_fpc":
            out["audio_tokens"] = randn(g, B, F, 3, 12)
        else:
            out["present_tokens"] = randn(g, B, F, 3, D)
        return out

    def forward(self, model, inputs):
        return model(**inputs).sample

    def prepare(self, model, stage: int | None = None):
        wake_zero_initialised(model, *NEW_ATTENTION_OUTPUTS)
        if stage is not None:
            returned = model.freeze_for_stage(stage)
            names = {id(p): n for n, p in model.named_parameters()}
            assert {names[id(p)] for p in returned} == set(model.trainable_parameter_names(stage))

    def trainable(self, model, stage: int | None = None):
        if stage is None:
            return super().trainable(model)
        return set(model.trainable_parameter_names(stage))

    @pytest.mark.parametrize("stage", [1, 3])
    def test_gradient_flow(self, stage):
        got = self.check_gradient_flow(stage=stage)
        groups = {MCDMDenoiser.parameter_group(n) for n in got}
        assert groups == set(STAGE_GROUPS[stage])  # every group the stage trains learns, and nothing else


class TestMCDMDenoiserFull(DenoiserTester):
    variant = "full"

    def test_at_init_stage_3_reaches_only_the_zero_output_projections(self):
        """Why the testers wake zero-initialised layers: without it, stage 3's gradient stops at the new
        attentions' zero output projections (identity at init), and their q/k/v get exactly zero."""
        torch.manual_seed(self.seed)
        model = self.model_class(**self.init_kwargs())
        model.freeze_for_stage(3)
        expected = {n for n, _ in model.named_parameters() if any(m in n for m in NEW_ATTENTION_OUTPUTS)}
        model.train()
        self.loss(model, self.make_inputs()).backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.ne(0).any())}
        assert expected and got == expected


class TestMCDMDenoiserWoFa(DenoiserTester):
    variant = "wo_fa"


class TestMCDMDenoiserWoFpc(DenoiserTester):
    variant = "wo_fpc"


class TestMCDMDenoiserWoMta(DenoiserTester):
    variant = "wo_mta"


class TestMCDMDenoiserB1(DenoiserTester):
    variant = "b1"


class TestMCDMDenoiserB2(DenoiserTester):
    variant = "b2"


# =============================================================================================
# archived-clip priors
# =============================================================================================
class TestArchivedClipPrior(ModelTesterMixin):
    model_class = ArchivedClipPrior
    expected_shape = (B, A, 3, D)

    def init_kwargs(self):
        return dict(latent_channels=C, prior_dim=D, patch_size=4, num_queries=3, heads=2)

    def inputs(self, g):
        return dict(ref_latent=randn(g, B, C, H, W), archived_latents=randn(g, B, A, C, H, W))


class TestArchivedClipPriorWarmStartLayout(TestArchivedClipPrior):
    """The config ``warm_start`` writes: learnable positions and the output LayerNorm."""

    def init_kwargs(self):
        return dict(super().init_kwargs(), num_positions=4, output_norm=True)


class TestQFormerPrior(ModelTesterMixin):
    model_class = QFormerPrior
    expected_shape = (B, A, 2, D)

    def init_kwargs(self):
        return dict(latent_channels=C, prior_dim=D, patch_size=4, num_queries=2, archived_frames=A, num_layers=1,
                    heads=2)

    def inputs(self, g):
        return dict(ref_latent=randn(g, B, C, H, W), archived_latents=randn(g, B, A, C, H, W))


class TestReferenceUNetPrior(ModelTesterMixin):
    model_class = ReferenceUNetPrior
    expected_shape = (B, H * W + (H // 2) * (W // 2), D)  # the two levels' tokens, joined

    def init_kwargs(self):
        cfg = {k: v for k, v in UNET_TINY.items() if k not in ("up_block_types", "mta_features")}
        return dict(in_channels=C, prior_dim=D, **cfg)

    def inputs(self, g):
        return dict(ref_latent=randn(g, B, C, H, W))

    def forward(self, model, inputs):
        levels = model(**inputs)
        assert [t.shape[1] for t in levels] == [H * W, (H // 2) * (W // 2)]
        return torch.cat(levels, dim=1)


# =============================================================================================
# base-model reference tokens, wo_fpc audio tokens
# =============================================================================================
class TestReferenceTokens(ModelTesterMixin):
    model_class = ReferenceTokens
    expected_shape = (B, (H // 2) * (W // 2), D)

    def init_kwargs(self):
        return dict(latent_channels=C, sample_size=H, patch_size=2, dim=D)

    def inputs(self, g):
        return dict(ref_latent=randn(g, B, C, H, W))


class TestAudioWindowTokens(ModelTesterMixin):
    """No parameters: the round trip carries the standardisation buffers (``fit``)."""

    model_class = AudioWindowTokens
    expected_shape = (B, F, 3, 6)

    def init_kwargs(self):
        return dict(audio_dim=6, audio_window=1)

    def inputs(self, g):
        return dict(audio=randn(g, B, F, 6))


# =============================================================================================
# present-clip motion prior
# =============================================================================================
class TestPresentClipMotionPrior(ModelTesterMixin):
    model_class = PresentClipMotionPrior
    expected_shape = (B, F, 6 + 4 + 5)  # head, lip, expression eps joined

    def init_kwargs(self):
        # p_drop_landmarks 0: training_loss keeps every landmark clip (see the training-loss gradient test)
        return dict(audio_dim=12, ref_dim=20, head_dim=6, lip_dim=4, expression_dim=5, landmark_dim=24, dim=D,
                    num_layers=1, num_heads=2, ff_mult=2, audio_window=1, num_train_timesteps=100,
                    p_drop_landmarks=0.0)

    def inputs(self, g):
        # one item uses its landmarks, the other denoises its head: both paths are in one forward
        return dict(noisy_head=randn(g, B, F, 6), noisy_lip=randn(g, B, F, 4), noisy_expression=randn(g, B, F, 5),
                    timestep=torch.tensor([3, 70]), audio=randn(g, B, F, 12), ref_embedding=randn(g, B, 20),
                    landmarks=randn(g, B, F, 24), landmark_mask=torch.tensor([True, False]))

    def forward(self, model, inputs):
        out = model(**inputs)
        return torch.cat([out.head, out.lip, out.expression], dim=-1)

    def prepare(self, model, **case):
        # FiLM, adaLN-Zero modulations and the eps heads start at zero (identity / zero output)
        wake_zero_initialised(model, "film.to_gamma_beta.", ".norm1.linear.", "head_out.", "lip_out.",
                              "expression_out.")

    @staticmethod
    def _batch(landmarks: bool) -> dict:
        g = torch.Generator().manual_seed(5)
        out = dict(audio=randn(g, B, F, 12), ref_embedding=randn(g, B, 20), head=randn(g, B, F, 6),
                   lip=randn(g, B, F, 4), expression=randn(g, B, F, 5))
        if landmarks:
            out["landmarks"] = randn(g, B, F, 24)
        return out

    @pytest.mark.parametrize("landmarks", [False, True])
    def test_training_loss_gradient_flow(self, landmarks):
        """Eq. 3: without landmarks, everything but the landmark embedding learns; with the landmark clip
        kept (p_drop_landmarks 0), the head slot holds the landmark token, so the head embedding and the
        head eps output get no gradient (its error is not counted)."""
        batch = self._batch(landmarks)
        names = {n for n, _ in self.build().named_parameters()}
        unused = ("head_in.", "head_out.") if landmarks else ("landmark_in.",)
        expected = {n for n in names if not n.startswith(unused)}
        self.check_gradient_flow(
            loss=lambda model, _: model.training_loss(batch, generator=torch.Generator().manual_seed(0)),
            expected=expected)

    def test_sample_is_seeded(self):
        model = self.build().eval()
        batch = self._batch(landmarks=True)

        def sample(seed, **kw):
            return model.sample(batch["audio"], batch["ref_embedding"], num_inference_steps=2,
                                generator=torch.Generator().manual_seed(seed), **kw)

        a, b, other = sample(0), sample(0), sample(1)
        assert (a.head.shape, a.lip.shape, a.expression.shape) == ((B, F, 6), (B, F, 4), (B, F, 5))
        for key in ("head", "lip", "expression"):
            assert torch.equal(getattr(a, key), getattr(b, key))
            assert not torch.equal(getattr(a, key), getattr(other, key))
        guided = sample(0, landmarks=batch["landmarks"], head=batch["head"])
        assert torch.equal(guided.head, batch["head"])  # the driving video's head is returned as given


# =============================================================================================
# motion encoders, landmark guider
# =============================================================================================
class TestHeadPoseEncoder(ModelTesterMixin):
    """No parameters: the round trip carries the token statistics (``fit``)."""

    model_class = HeadPoseEncoder
    expected_shape = (5, 6)

    def init_kwargs(self):
        return dict(head_dim=6)

    def inputs(self, g):
        return dict(head_pose=randn(g, 5, 6))


class TestLipEncoder(ModelTesterMixin):
    model_class = LipEncoder
    expected_shape = (B, 8)

    def init_kwargs(self):
        return dict(window=5, lip_dim=8, channels=(8, 16))

    def inputs(self, g):
        return dict(mouth_windows=randn(g, B, 5, 16, 24))


class TestLipAudioEncoder(ModelTesterMixin):
    model_class = LipAudioEncoder
    expected_shape = (B, 8)

    def init_kwargs(self):
        return dict(audio_dim=10, window=5, lip_dim=8, hidden=16)

    def inputs(self, g):
        return dict(audio_windows=randn(g, B, 5, 10))


class TestExpressionEncoder(ModelTesterMixin):
    model_class = ExpressionEncoder
    expected_shape = (B, 4 + 20)  # code and reconstruction joined

    def init_kwargs(self):
        return dict(in_dim=20, expression_dim=4, hidden=16)

    def inputs(self, g):
        return dict(offsets=randn(g, B, 20))

    def forward(self, model, inputs):
        return torch.cat(model(**inputs), dim=-1)


class TestLandmarkGuider(ModelTesterMixin):
    model_class = LandmarkGuider
    expected_shape = (B, 4, 8, 8)

    def init_kwargs(self):
        return dict(conditioning_channels=1, embedding_channels=4, block_out_channels=(8, 16))

    def inputs(self, g):
        return dict(images=randn(g, B, 1, 16, 16))

    def prepare(self, model, **case):
        wake_zero_initialised(model, "conv_out.")  # zero output conv: the guider starts as a no-op


# =============================================================================================
# SyncNets
# =============================================================================================
class TestSyncNet(ModelTesterMixin):
    model_class = SyncNet
    expected_shape = (B,)

    def init_kwargs(self):
        return dict(mouth_height=16, mouth_width=24, channels=(8, 16), embed_dim=16)

    def inputs(self, g):
        return dict(mouths=torch.rand(B, 1, 5, 16, 24, generator=g), mfcc=randn(g, B, 1, 13, 20))


class TestOfficialSyncNet(ModelTesterMixin):
    """Fixed size (the released layout): 224 x 224 faces, 1024-d embeddings."""

    model_class = OfficialSyncNet
    expected_shape = (B,)

    def init_kwargs(self):
        return dict()

    def inputs(self, g):
        return dict(faces=255 * torch.rand(B, 3, 5, 224, 224, generator=g), mfcc=randn(g, B, 1, 13, 20))


# =============================================================================================
# every model class has a tester
# =============================================================================================
def model_classes_under_mcdm_models() -> set[type]:
    """Every ``ModelMixin`` subclass defined (not just imported) in a module under ``mcdm.models``."""
    found = set()
    for info in pkgutil.walk_packages(mcdm.models.__path__, prefix="mcdm.models."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, ModelMixin) and obj.__module__ == module.__name__:
                found.add(obj)
    return found


def test_every_model_class_has_a_tester():
    tested = {obj.model_class for name, obj in globals().items()
              if name.startswith("Test") and inspect.isclass(obj) and issubclass(obj, ModelTesterMixin)}
    found = model_classes_under_mcdm_models()
    assert {MCDMDenoiser, MCDMUNet, SyncNet} <= found  # the walk reaches subpackages (mcdm.models.sync)
    untested = sorted(cls.__qualname__ for cls in found - tested)
    assert not untested, f"model classes without a ModelTesterMixin test class in {__name__}: {untested}"
    assert tested <= found  # every tester tests a class of mcdm.models
