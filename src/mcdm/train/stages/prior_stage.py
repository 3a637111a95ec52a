"""Stage 2: the present-clip motion-prior diffusion model (Eq. 3)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from einops import rearrange
from torch import nn

from mcdm.errors import McdmError
from mcdm.media.layout import AUDIO_TOKENS, LANDMARK_GUIDER, MOTION_PRIOR, STAGE_JSON
from mcdm.models.audio_tokens import AudioWindowTokens
from mcdm.models.landmark_guider import LandmarkGuider
from mcdm.models.motion_encoders import MotionEncoders
from mcdm.train.builders import motion_prior_from_params
from mcdm.train.data import move_batch
from mcdm.train.datasets import ClipRuns, audio_frames, load_feature_set, ref_embeddings
from mcdm.train.stages.inputs import component, file_digest, previous_output, require, stage_name
from mcdm.train.stages.task import EVAL_ITEMS, EVAL_SEED, StageTask

PREVIEW_PRIOR_STEPS = 10  # DDIM steps of the stage-2 picture (a picture only: not model.prior_inference_steps)


class Stage2(StageTask):
    """Stage 2: the present-clip motion-prior diffusion model (Eq. 3), landmark clips randomly dropped."""

    stage = 2
    precision = "fp32"  # the prior is small; its conditions are standardised in fp32

    def setup(self) -> None:
        prev1, info1 = previous_output(self.inputs, 1)
        self.fingerprint["stage1"] = file_digest(prev1 / STAGE_JSON)
        if self.params.variant == "wo_fpc":
            self._setup_audio_tokens()
            return
        encoders = MotionEncoders.load(require(self.inputs.motion_encoders, "--motion-encoders", "motion_encoders"))
        self.fingerprint["motion_encoders"] = file_digest(self.inputs.motion_encoders / "metrics.json")
        guider = component(prev1, LANDMARK_GUIDER, LandmarkGuider, 1)
        self.features = load_feature_set(self.inputs.features, motion_encoders=encoders, show_progress=self.show_progress)
        self.fingerprint["features"] = self.features.fingerprint()
        prior = motion_prior_from_params(self.params.model, self.features.audio_dim, self.features.ref_dim,
                                                   guider.token_dim)
        for name, dim in encoders.dims.items():
            if prior.config[f"{name}_dim"] != dim:
                raise McdmError(f"model.{name}_dim={prior.config[f'{name}_dim']} but the motion encoders make {dim}-wide "
                                f"{name} tokens: re-run `dvc repro motion_encoders`")
        prior.fit_condition_statistics(audio_frames(self.features), ref_embeddings(self.features))
        prior.requires_grad_(True)
        self.parts = {MOTION_PRIOR: prior, LANDMARK_GUIDER: guider}
        m = self.params.model
        # the prior reads no archived frames (archived_frames=0: none are cut)
        self.dataset = ClipRuns(self.features, m.clip_frames, 0, clips_per_run=1, with_tokens=True)

    def _setup_audio_tokens(self) -> None:
        """wo_fpc has no present-clip prior: this stage fits its audio tokens' statistics, no steps."""
        self.trains = False
        self.features = load_feature_set(self.inputs.features, show_progress=self.show_progress)
        self.fingerprint["features"] = self.features.fingerprint()
        tokens = AudioWindowTokens(self.features.audio_dim, self.params.model.audio_window)
        if self.features.audio_dim != self.params.model.audio_dim:
            raise McdmError(f"model.audio_dim={self.params.model.audio_dim} but the features hold "
                            f"{self.features.audio_dim}-wide audio (wo_fpc's present attention reads them)")
        self.parts = {AUDIO_TOKENS: tokens.fit(audio_frames(self.features)).requires_grad_(False)}

    def loss(self, batch: dict, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        prior = self.parts[MOTION_PRIOR]
        guider = self.parts[LANDMARK_GUIDER]
        b = batch["audio"].shape[0]
        with torch.no_grad():  # landmark tokens of the frozen guider
            landmarks = rearrange(guider.tokens(rearrange(batch["landmark_images"][:, 0], "b f 1 s t -> (b f) 1 s t")),
                                  "(b f) d -> b f d", b=b)
        return prior.training_loss({
            "audio": batch["audio"][:, 0], "ref_embedding": batch["ref_embedding"], "head": batch["head"][:, 0],
            "lip": batch["lip"][:, 0], "expression": batch["expression"][:, 0], "landmarks": landmarks,
        }, generator=generator)

    def export_modules(self) -> dict[str, nn.Module]:
        if self.params.variant == "wo_fpc":
            return {AUDIO_TOKENS: self.parts[AUDIO_TOKENS]}
        return {MOTION_PRIOR: self.parts[MOTION_PRIOR]}

    @torch.no_grad()
    def fixed_batch_loss(self) -> Optional[float]:
        """Eq. 3 on a fixed batch with fixed timesteps, noise and landmark drops (a private generator)."""
        if not self.trains:
            return None

        was_training = self.model.training
        self.model.eval()
        batch = move_batch(self.dataset.sampled_items(4 * EVAL_ITEMS), self.device, torch.float32)
        loss = self.loss(batch, generator=torch.Generator().manual_seed(EVAL_SEED))
        self.model.train(was_training)
        return float(loss)

    @torch.no_grad()
    def preview(self, out_dir: Path) -> Optional[Path]:
        """True vs sampled (no landmarks) lip and expression tokens of one clip, first 3 channels each."""
        if not self.trains:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt


        prior = self.parts[MOTION_PRIOR]
        was_training = self.model.training
        self.model.eval()
        batch = move_batch(self.dataset.fixed_items(1), self.device, torch.float32)
        sampled = prior.sample(batch["audio"][:, 0], batch["ref_embedding"], num_inference_steps=PREVIEW_PRIOR_STEPS,
                               generator=torch.Generator(self.device).manual_seed(0))
        fig, axes = plt.subplots(2, 3, figsize=(10, 5), sharex=True)
        for row, name in enumerate(("lip", "expression")):
            for ch in range(min(3, batch[name].shape[-1])):
                ax = axes[row, ch]
                ax.plot(batch[name][0, 0, :, ch].cpu(), label="true", color="black")
                ax.plot(getattr(sampled, name)[0, :, ch].cpu(), label="sampled", color="tab:orange")
                ax.set_title(f"{name} token, channel {ch}", fontsize=9)
        axes[0, 0].legend(fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel("frame")
        fig.tight_layout()
        out = out_dir / f"{stage_name(self.stage)}_tokens.png"
        fig.savefig(out, dpi=80)
        plt.close(fig)
        self.model.train(was_training)
        return out
