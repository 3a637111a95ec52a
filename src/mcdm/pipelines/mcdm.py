"""Long-term talking-face generation (paper Sec. 3, "Inference"): a diffusers ``DiffusionPipeline``.

    pipe = MCDMPipeline.from_checkpoint("models", params)          # or a pipeline folder, or models:/name@alias
    pipe("face.png", "speech.wav", output_path="talk.mp4")         # mp4 with the audio muxed in

Per present clip of F = ``clip_frames`` frames, clip after clip:

1. present-clip motion prior: head / lip / expression tokens of the clip sampled from its audio
   features and the reference identity embedding (``PresentClipMotionPrior.sample``; with a driving
   landmark video the head comes from its pose and the prior is guided by its landmark tokens), made
   into F_pc (B, F, 3, d). ``wo_fpc`` reads per-frame audio windows instead.
2. archived-clip motion prior: F_ac from the reference latent and the archived window of a latents
   (``MCDMDenoiser.encode_archived``), computed once per clip.
3. denoising: the clip's latents (B, 4, F, h, w) start from Gaussian noise and run
   ``num_inference_steps`` of the scheduler (DDIM by default; any diffusers scheduler built from the
   same config works: ``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``).
   Every step reads the MTA memory carried from the previous clip; the memory returned by the last
   (least noisy) step is carried to the next clip (Eq. 4-5; only M_T, one frame's worth per block).
4. carry: the archived window starts as the reference latent repeated a times and then holds the
   latest a generated latents; the memory state is replaced, not appended to.
5. decode: the clip's latents go through the VAE and its frames are handed out (yielded or written
   to the mp4) at once, so a video of any length needs the memory of one clip.

The last clip is filled up to F frames by repeating the last audio (and landmark) frame; the extra
frames are dropped. Reference and driving-video preprocessing match the faces stage
(``mcdm.pipelines.preprocessing``).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from einops import rearrange, repeat

from mcdm.config import DATA_FILTERS, DataParams, Params
from mcdm.errors import McdmError, MissingStageOutput
from mcdm.models.frame_noise import frame_correlated_noise

# The models/ folder the DVC stages write: component -> (subfolder, stage that writes it).
MODELS_LAYOUT = {
    "base": ("base", "base_models"),
    "landmark_guider": ("stage1/landmark_guider", "train_stage1"),
    "motion_prior": ("stage2/motion_prior", "train_stage2"),
    "audio_tokens": ("stage2/audio_tokens", "train_stage2"),
    "denoiser": ("stage3/denoiser", "train_stage3"),
    "head_encoder": ("motion_encoders/head", "motion_encoders"),
}
STAGE_JSON = "stage.json"
# The folder stage 3 registers (``mcdm.train.stages.registry_bundle``): component -> subfolder.
BUNDLE_LAYOUT = {"base": ".", "denoiser": "denoiser", "motion_prior": "motion_prior", "audio_tokens": "audio_tokens",
                 "landmark_guider": "landmark_guider", "head_encoder": "motion_encoders/head"}
DECODE_CHUNK = 8  # frames per VAE decode call
AUDIO_CHUNK_SECONDS, AUDIO_CONTEXT_SECONDS = 20.0, 2.0  # audio encoded piecewise (constant memory)


@dataclass
class ClipState:
    """What one present clip produced (yielded by ``MCDMPipeline.iter_clips``)."""

    index: int
    start: int  # index of the clip's first frame in the video
    frames: np.ndarray  # (B, n, H, W, 3) uint8, n <= clip_frames (the last clip may be shorter)
    latents: torch.Tensor  # (B, C, F, h, w) the clip's denoised latents
    archived_latents: torch.Tensor  # (B, a, C, h, w) the archived window the NEXT clip reads
    memory_state: Optional[dict]  # MTA memory carried to the next clip (block -> (B, h_l*w_l, C)); None: wo_mta


@dataclass
class MCDMPipelineOutput(BaseOutput):
    """``frames`` (T, H, W, 3) uint8 (None when written to ``path``), ``n_frames``, ``fps``."""

    frames: Optional[np.ndarray]
    path: Optional[str]
    n_frames: int
    fps: float


# ---------------------------------------------------------------------------------------------------
# frozen encoders given as loaded models (the mcdm.models.encoders classes take a folder)
# ---------------------------------------------------------------------------------------------------


def _loaded_wav2vec2(model):
    from mcdm.models.encoders import Wav2Vec2Audio

    backend = Wav2Vec2Audio.__new__(Wav2Vec2Audio)  # same __call__, model given instead of a folder
    backend.model, backend.device = model.eval(), model.device
    backend.dim, backend.normalize = int(model.config.hidden_size), True
    return backend


def _loaded_clip(model):
    from mcdm.models.encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipIdentity

    backend = ClipIdentity.__new__(ClipIdentity)
    backend.model, backend.device = model.eval(), model.device
    backend.dim, backend.size = int(model.config.projection_dim), int(model.config.image_size)
    backend.mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    backend.std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return backend


def _pad_time(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Repeat the last frame of (B, T, ...) ``pad`` times."""
    if pad <= 0:
        return x
    return torch.cat([x, x[:, -1:].expand(-1, pad, *x.shape[2:])], dim=1)


# ---------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------


class MCDMPipeline(DiffusionPipeline):
    r"""MCDM long-term generation: reference portrait + speech (+ optional landmark video) -> video.

    Components: ``vae`` (frozen AutoencoderKL), ``denoiser`` (``MCDMDenoiser`` of any variant),
    ``scheduler`` (DDIM from the training schedule), ``motion_prior`` (``PresentClipMotionPrior``; not
    used by ``wo_fpc``, which reads ``audio_tokens``, stage 2's ``AudioWindowTokens``), ``landmark_guider`` and ``head_encoder`` (only for landmark-driven generation),
    ``audio_encoder`` (Wav2Vec2Model, or None for the ``logmel`` backend) and ``image_encoder``
    (CLIPVisionModelWithProjection, or None for the ``dlib+vae`` backend). Config: ``data`` (the
    ``data`` params the training clips were made with: fps, resolution, crop), ``clip_frames``,
    ``prior_steps``, ``audio_window``, ``default_steps`` (``eval.steps``), ``frame_noise_correlation``
    (rho of the clips' initial noise, ``model.frame_noise_correlation``: as the denoiser was trained),
    backends and provenance.
    """

    model_cpu_offload_seq = "motion_prior->denoiser->vae"
    _optional_components = ["motion_prior", "audio_tokens", "landmark_guider", "head_encoder", "audio_encoder",
                            "image_encoder"]

    def __init__(
        self,
        vae,
        denoiser,
        scheduler,
        motion_prior=None,
        audio_tokens=None,
        landmark_guider=None,
        head_encoder=None,
        audio_encoder=None,
        image_encoder=None,
        data: Optional[dict] = None,
        clip_frames: int = 8,
        prior_steps: int = 20,
        audio_window: int = 2,
        default_steps: int = 10,
        frame_noise_correlation: float = 0.0,
        audio_backend: str = "logmel",
        image_backend: str = "dlib+vae",
        provenance: Optional[dict] = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, denoiser=denoiser, scheduler=scheduler, motion_prior=motion_prior,
                              audio_tokens=audio_tokens, landmark_guider=landmark_guider, head_encoder=head_encoder,
                              audio_encoder=audio_encoder, image_encoder=image_encoder)
        self.register_to_config(data=dict(data or clip_format(DataParams())), clip_frames=int(clip_frames),
                                prior_steps=int(prior_steps), audio_window=int(audio_window),
                                default_steps=int(default_steps), frame_noise_correlation=float(frame_noise_correlation),
                                audio_backend=audio_backend,
                                image_backend=image_backend, provenance=dict(provenance or {}))
        self.set_progress_bar_config(desc="generating", unit="frame")
        self._audio = self._identity = None
        self._check_components()

    # ------------------------------------------------------------------------------------------ set-up
    @property
    def variant(self) -> str:
        return str(self.denoiser.config.model_variant)

    @property
    def data_params(self) -> DataParams:
        return DataParams(**{k: v for k, v in self.config.data.items() if k in DataParams.model_fields})

    @property
    def fps(self) -> float:
        return float(self.data_params.fps)

    @property
    def audio_backend(self):
        """Callable ``(audio_16k, fps, n_frames) -> (T, A)`` of the backend the training features used."""
        if self._audio is None:
            from mcdm.models.encoders import LogMelAudio

            if self.config.audio_backend == "wav2vec2":
                if self.audio_encoder is None:
                    raise McdmError("pipeline: audio backend wav2vec2 but no audio_encoder component")
                self._audio = _loaded_wav2vec2(self.audio_encoder)
            elif self.config.audio_backend == "logmel":
                self._audio = LogMelAudio()
            else:
                raise McdmError(f"pipeline: unknown audio backend {self.config.audio_backend!r}")
        return self._audio

    @property
    def identity_backend(self):
        """Callable ``(rgb crop, landmarks (68, 2) or None) -> (E,)``: the reference identity embedding."""
        if self._identity is None:
            from mcdm.models.encoders import DlibVaeIdentity

            if self.config.image_backend == "clip":
                if self.image_encoder is None:
                    raise McdmError("pipeline: image backend clip but no image_encoder component")
                self._identity = _loaded_clip(self.image_encoder)
            elif self.config.image_backend == "dlib+vae":
                self._identity = DlibVaeIdentity(self.vae, self.vae.device)
            else:
                raise McdmError(f"pipeline: unknown image backend {self.config.image_backend!r}")
        return self._identity

    def _check_components(self) -> None:
        """One-line errors for components that cannot work together (e.g. a prior trained on other features)."""
        den = self.denoiser.config
        if int(self.vae.config.latent_channels) != int(den.latent_channels):
            raise McdmError(f"pipeline: VAE has {self.vae.config.latent_channels} latent channels, the denoiser "
                            f"{den.latent_channels}")
        audio_dim = {"logmel": 80}.get(self.config.audio_backend)
        if self.audio_encoder is not None:
            audio_dim = int(self.audio_encoder.config.hidden_size)
        if den.model_variant == "wo_fpc":
            if self.audio_tokens is None:
                raise McdmError("pipeline: variant wo_fpc needs stage 2's audio tokens (run `dvc repro train_stage2`)")
            if audio_dim is not None and int(den.audio_dim) != audio_dim:
                raise McdmError(f"pipeline: wo_fpc denoiser reads {den.audio_dim}-d audio, the "
                                f"{self.config.audio_backend} backend gives {audio_dim}")
            return
        if self.motion_prior is None:
            raise McdmError(f"pipeline: variant {den.model_variant} needs the present-clip motion prior "
                            "(run `dvc repro train_stage2`)")
        prior = self.motion_prior.config
        if audio_dim is not None and int(prior.audio_dim) != audio_dim:
            raise McdmError(f"pipeline: the motion prior reads {prior.audio_dim}-d audio, the "
                            f"{self.config.audio_backend} backend gives {audio_dim}")
        identity_dim = {"dlib+vae": 128 + 4 * int(self.vae.config.latent_channels)}.get(self.config.image_backend)
        if self.image_encoder is not None:
            identity_dim = int(self.image_encoder.config.projection_dim)
        if identity_dim is not None and int(prior.ref_dim) != identity_dim:
            raise McdmError(f"pipeline: the motion prior reads {prior.ref_dim}-d reference embeddings, the "
                            f"{self.config.image_backend} backend gives {identity_dim}")
        if int(prior.dim) != int(den.prior_dim):
            raise McdmError(f"pipeline: motion prior tokens are {prior.dim}-d, the denoiser reads {den.prior_dim}-d")

    def check_variant(self, expected: str) -> None:
        """One-line error when the checkpoint is of another variant than ``expected`` (``params.variant``)."""
        if self.variant != expected:
            source = self.config.provenance.get("source", "the checkpoint")
            raise McdmError(f"checkpoint {source} is variant {self.variant!r}, but params.variant is {expected!r} "
                            f"(use a checkpoint of {expected!r} or set variant: {self.variant})")

    # ---------------------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_reference(self, crops: np.ndarray, landmarks: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, S, 3) uint8 crops (+ (B, 68, 2) crop-pixel landmarks) -> scaled VAE latents (B, C, h, w)
        and identity embeddings (B, E), as the features stage computes them for the training clips."""
        from mcdm.train.base_models.vae import encode_latents

        crops = np.asarray(crops)
        side = self.data_params.resolution
        if crops.ndim != 4 or crops.shape[1:] != (side, side, 3):
            raise McdmError(f"reference: expected (B, {side}, {side}, 3) crops, got {crops.shape}")
        latents = encode_latents(self.vae, crops).to(self.device, self.denoiser.dtype)
        emb = [self.identity_backend(c, None if landmarks is None else landmarks[i]) for i, c in enumerate(crops)]
        return latents, torch.as_tensor(np.stack(emb), dtype=torch.float32, device=self.device)

    def audio_features(self, audio_16k: np.ndarray, n_frames: int, chunk_seconds: float = AUDIO_CHUNK_SECONDS,
                       context_seconds: float = AUDIO_CONTEXT_SECONDS) -> torch.Tensor:
        """(n_frames, A) audio features of the backend, aligned to the video frames.

        Long audio is encoded in chunks of ``chunk_seconds`` with ``context_seconds`` of audio on each
        side (cut away afterwards), so the encoder's working memory does not grow with the audio (the
        log-mel features of inner frames are exactly those of one pass; wav2vec2 sees 20 s + context).
        """
        audio = np.asarray(audio_16k, np.float32).reshape(-1)
        fps, rate = self.fps, int(self.data_params.audio_rate)
        chunk, ctx = max(1, int(round(chunk_seconds * fps))), int(round(context_seconds * fps))
        if n_frames <= chunk + 2 * ctx:
            return torch.from_numpy(np.asarray(self.audio_backend(audio, fps, n_frames=n_frames), np.float32))
        out = None
        for f0 in range(0, n_frames, chunk):
            f1 = min(f0 + chunk, n_frames)
            a0, a1 = max(0, f0 - ctx), min(n_frames, f1 + ctx)
            piece = audio[int(round(a0 / fps * rate)):int(round(a1 / fps * rate))]
            feats = np.asarray(self.audio_backend(piece, fps, n_frames=a1 - a0), np.float32)
            if out is None:
                out = np.empty((n_frames, feats.shape[1]), np.float32)
            out[f0:f1] = feats[f0 - a0:f1 - a0]
        return torch.from_numpy(out)

    # ---------------------------------------------------------------------------------------- the loop
    @torch.no_grad()
    def iter_clips(
        self,
        ref_latent: torch.Tensor,
        ref_embedding: torch.Tensor,
        audio_feats: torch.Tensor,
        *,
        landmarks: Optional[torch.Tensor] = None,
        head_pose: Optional[torch.Tensor] = None,
        num_inference_steps: Optional[int] = None,
        prior_steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        eta: float = 0.0,
        frame_noise_correlation: Optional[float] = None,
    ) -> Iterator[ClipState]:
        """Generate clip after clip; yields a ``ClipState`` per clip (frames decoded, state carried).

        ref_latent (B, C, h, w) scaled VAE latents; ref_embedding (B, E); audio_feats (B, T, A);
        landmarks (B, T, 68, 2) crop pixels and head_pose (B, T, 6) for landmark-driven generation.
        Only the archived window (a latents) and the last memory state live across clips.
        ``frame_noise_correlation``: rho of the clips' initial noise (default: the config's, i.e. training's).
        """
        from mcdm.train.base_models.vae import to_uint8

        den, dev, dtype = self.denoiser, self.device, self.denoiser.dtype
        variant, a, F = self.variant, int(den.config.archived_frames), int(self.config.clip_frames)
        steps = int(num_inference_steps or self.config.default_steps)
        prior_steps = int(prior_steps or self.config.prior_steps)
        rho = float(self.config.frame_noise_correlation if frame_noise_correlation is None else frame_noise_correlation)
        batch, n_frames = audio_feats.shape[:2]
        if n_frames < 1:
            raise McdmError("generate: nothing to generate (0 frames)")
        n_clips = math.ceil(n_frames / F)
        pad = n_clips * F - n_frames
        audio_feats = _pad_time(audio_feats.float(), pad)
        audio_tokens = self.audio_tokens(audio_feats.to(dev)) if variant == "wo_fpc" else None  # (B, T, 2w+1, A)
        driven = landmarks is not None
        if driven:
            self._check_landmark_components()
            if head_pose is None:
                raise McdmError("generate: landmarks given without their head pose")
            landmarks, head_pose = _pad_time(landmarks.float(), pad), _pad_time(head_pose.float(), pad)
        side = self.data_params.resolution
        scale = float(self.vae.config.scaling_factor)
        shift = float(self.vae.config.get("shift_factor") or 0.0)
        ref_latent = ref_latent.to(dev, dtype)
        ref_embedding = ref_embedding.to(dev)

        # the archived clip starts as the reference frame; the memory as nothing (Eq. 4 at the first frame)
        archived = repeat(ref_latent, "b c h w -> b a c h w", a=a)
        memory = None
        for k in range(n_clips):
            s, e = k * F, (k + 1) * F
            # 1. present-clip motion prior -> F_pc (B, F, 3, d) (wo_fpc: audio windows (B, F, k, A))
            present = None
            if variant != "wo_fpc":
                lm_tokens = head = None
                if driven:
                    lm_tokens = self.landmark_guider.landmark_tokens(landmarks[:, s:e], side)
                    head = self.head_encoder(head_pose[:, s:e].reshape(-1, head_pose.shape[-1])).reshape(batch, F, -1)
                motion = self.motion_prior.sample(audio_feats[:, s:e].to(dev), ref_embedding, landmarks=lm_tokens,
                                                  head=head, num_inference_steps=prior_steps, generator=generator)
                present = self.motion_prior.present_clip_tokens(motion.head, motion.lip, motion.expression).to(dtype)
            clip_audio = None if audio_tokens is None else audio_tokens[:, s:e].to(dev, dtype)
            # 2. archived-clip motion prior F_ac, once per clip (independent of the timestep)
            archived_tokens = den.encode_archived(ref_latent, archived)
            # 3. landmark guider features added after conv_in (landmark-driven only)
            guide = None
            if driven:
                from mcdm.models.encoders import render_landmark_heatmaps

                images = render_landmark_heatmaps(rearrange(landmarks[:, s:e], "b f p c -> (b f) p c").cpu(), side)
                guide = rearrange(self.landmark_guider(images.to(dev, self.landmark_guider.dtype)),
                                  "(b f) c h w -> b c f h w", b=batch).to(dtype)
            # 4. reverse diffusion of the clip, every step reading the memory of the previous clip
            self.scheduler.set_timesteps(steps, device=dev)
            shape = (batch, ref_latent.shape[1], F, *ref_latent.shape[-2:])
            # the frames' initial noise correlated as in training (models/frame_noise.py)
            latents = frame_correlated_noise(shape, rho, generator=generator, device=dev, dtype=dtype)
            latents = latents * self.scheduler.init_noise_sigma
            step_kwargs = {"eta": eta, "generator": generator} if isinstance(self.scheduler, DDIMScheduler) else {}
            memory_out = None
            for t in self.scheduler.timesteps:
                out = den(self.scheduler.scale_model_input(latents, t), t, archived_tokens=archived_tokens,
                          present_tokens=present, audio_tokens=clip_audio, memory_state=memory,
                          landmark_features=guide)
                latents = self.scheduler.step(out.sample, t, latents, **step_kwargs).prev_sample
                memory_out = out.memory_state
            # 5. carry to the next clip: the latest a generated latents, the last memory state M_T
            archived = torch.cat([archived, rearrange(latents, "b c f h w -> b f c h w")], dim=1)[:, -a:]
            memory = memory_out
            # 6. decode and hand the frames out now
            z = rearrange(latents, "b c f h w -> (b f) c h w") / scale + shift
            images = torch.cat([self.vae.decode(chunk.to(self.vae.dtype)).sample for chunk in z.split(DECODE_CHUNK)])
            frames = rearrange(to_uint8(images), "(b f) h w c -> b f h w c", b=batch)
            keep = min(F, n_frames - s)
            yield ClipState(k, s, frames[:, :keep], latents, archived, memory)

    def _check_landmark_components(self) -> None:
        if self.landmark_guider is None or self.head_encoder is None:
            raise McdmError("--landmarks: this checkpoint has no landmark guider / head encoder "
                            "(stage 1 and motion_encoders outputs)")
        if self.variant == "wo_fpc":
            raise McdmError("--landmarks: variant wo_fpc has no motion prior to guide")
        c_out = int(self.landmark_guider.config.embedding_channels)
        c_unet = int(self.denoiser.config.block_out_channels[0])
        if c_out != c_unet:
            raise McdmError(f"--landmarks: the landmark guider gives {c_out} channels, the UNet's conv_in has {c_unet}")

    # ---------------------------------------------------------------------------------------- entry points
    def prepare_driving(self, landmarks, n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A landmark video path, or (T, 68, 2) crop-pixel landmarks -> (1, T, 68, 2), (1, T, 6)."""
        from mcdm.models.encoders import head_pose_from_landmarks
        from mcdm.pipelines.preprocessing import driving_landmarks

        if isinstance(landmarks, (str, Path)):
            track = driving_landmarks(landmarks, self.data_params, n_frames)
            marks, pose = track.landmarks, track.head_pose
        else:
            marks = np.asarray(landmarks, np.float32)
            if marks.ndim != 3 or marks.shape[1:] != (68, 2) or len(marks) < n_frames:
                raise McdmError(f"landmarks: expected ({n_frames}+, 68, 2) crop-pixel landmarks, got {marks.shape}")
            marks = marks[:n_frames]
            pose = head_pose_from_landmarks(marks, self.data_params.resolution)
        return torch.from_numpy(np.ascontiguousarray(marks))[None], torch.from_numpy(np.asarray(pose, np.float32))[None]

    @torch.no_grad()
    def __call__(
        self,
        ref_image,
        audio,
        seconds: Optional[float] = None,
        landmarks=None,
        num_inference_steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        output_path: Optional[str | Path] = None,
        crop_face: bool = True,
        ref_landmarks: Optional[np.ndarray] = None,
        eta: float = 0.0,
    ) -> MCDMPipelineOutput:
        """Generate a talking-face video of one portrait.

        Args:
            ref_image: portrait (RGB uint8 array or image path); the face is found and cropped as the
                faces stage crops training clips. With ``crop_face=False`` it must already be a
                ``data.resolution`` crop (then ``ref_landmarks`` (68, 2) help the identity encoder).
            audio: speech, 16 kHz mono float array or any audio / video file.
            seconds: generate only the first ``seconds`` of the audio (default: all of it).
            landmarks: optional driving landmarks: a video path, or (T, 68, 2) crop-pixel landmarks.
            num_inference_steps: denoising steps per clip (default ``default_steps`` = ``eval.steps``).
            generator: torch generator (noise of the prior and of the denoiser).
            output_path: write an mp4 (H.264 + AAC with the audio) as frames come, keep none in memory.
        """
        from mcdm.media.io import MediaError, write_video
        from mcdm.pipelines.preprocessing import crop_portrait, read_image, read_speech

        data = self.data_params
        rate = int(data.audio_rate)
        # 1. inputs: the speech, its length in frames
        if isinstance(audio, (str, Path)):
            audio = read_speech(audio, rate)
        audio = np.asarray(audio, np.float32).reshape(-1)
        if audio.size == 0:
            raise McdmError("audio: empty")
        duration = audio.size / rate
        if seconds is not None:
            if seconds <= 0:
                raise McdmError(f"--seconds: must be > 0 (got {seconds})")
            if seconds > duration + 0.5 / self.fps:
                raise McdmError(f"--seconds {seconds:g} is longer than the audio ({duration:.2f} s)")
            duration = seconds
        n_frames = max(1, int(round(duration * self.fps)))
        segment = audio[: int(round(n_frames / self.fps * rate))]
        segment = np.pad(segment, (0, max(0, int(round(n_frames / self.fps * rate)) - segment.size)))
        # 2. the reference: crop like the faces stage, latents + identity embedding
        if isinstance(ref_image, (str, Path)):
            ref_image = read_image(ref_image)
        ref_image = np.asarray(ref_image, np.uint8)
        if crop_face:
            portrait = crop_portrait(ref_image, data)
            crop, ref_landmarks = portrait.image, portrait.landmarks
        else:
            crop = ref_image
        ref_latent, ref_embedding = self.encode_reference(crop[None], None if ref_landmarks is None else np.asarray(ref_landmarks)[None])
        feats = self.audio_features(segment, n_frames)[None]
        lm = pose = None
        if landmarks is not None:
            lm, pose = self.prepare_driving(landmarks, n_frames)
        clips = self.iter_clips(ref_latent, ref_embedding, feats, landmarks=lm, head_pose=pose,
                                num_inference_steps=num_inference_steps, generator=generator, eta=eta)
        # 3. stream: frames are written (or collected) clip by clip, with a progress bar in frames
        with self.progress_bar(total=n_frames) as bar:
            def frames():
                for clip in clips:
                    bar.update(clip.frames.shape[1])
                    yield from clip.frames[0]

            if output_path is None:
                video = np.stack(list(frames()))
                return MCDMPipelineOutput(frames=video, path=None, n_frames=len(video), fps=self.fps)
            try:
                write_video(output_path, frames(), fps=self.fps, audio=segment, audio_rate=rate)
            except (MediaError, ValueError, OSError) as err:
                raise McdmError(f"{output_path}: cannot write the video ({str(err).splitlines()[0]})") from None
        return MCDMPipelineOutput(frames=None, path=str(output_path), n_frames=n_frames, fps=self.fps)

    @torch.no_grad()
    def generate_batch(self, crops: np.ndarray, audios: Sequence[np.ndarray], n_frames: int,
                       ref_landmarks: Optional[np.ndarray] = None, landmarks: Optional[np.ndarray] = None,
                       num_inference_steps: Optional[int] = None, generator: Optional[torch.Generator] = None,
                       progress: bool = True) -> np.ndarray:
        """B ready crops (B, S, S, 3) + B audio tracks -> (B, n_frames, S, S, 3) uint8 (evaluation).

        Audio shorter than ``n_frames`` is padded with silence (cut the extra frames afterwards);
        ``landmarks`` (B, n_frames, 68, 2) crop pixels drive every item when given.
        """
        feats = torch.stack([self.audio_features(np.asarray(a, np.float32), n_frames) for a in audios])
        ref_latent, ref_embedding = self.encode_reference(crops, ref_landmarks)
        lm = pose = None
        if landmarks is not None:
            from mcdm.models.encoders import head_pose_from_landmarks

            lm = torch.as_tensor(np.asarray(landmarks, np.float32)[:, :n_frames])
            pose = torch.stack([torch.as_tensor(head_pose_from_landmarks(m, self.data_params.resolution)) for m in lm.numpy()])
        from tqdm.auto import tqdm

        out = []
        with tqdm(total=n_frames * len(crops), desc="generating", unit="frame", disable=not progress) as bar:
            for clip in self.iter_clips(ref_latent, ref_embedding, feats, landmarks=lm, head_pose=pose,
                                        num_inference_steps=num_inference_steps, generator=generator):
                out.append(clip.frames)
                bar.update(clip.frames.shape[0] * clip.frames.shape[1])
        return np.concatenate(out, axis=1)

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def from_stages(
        cls,
        params: Params,
        base: str | Path,
        denoiser: str | Path,
        motion_prior: Optional[str | Path] = None,
        audio_tokens: Optional[str | Path] = None,
        landmark_guider: Optional[str | Path] = None,
        head_encoder: Optional[str | Path] = None,
        stage_json: Optional[str | Path] = None,
        device: str | torch.device = "cpu",
    ) -> "MCDMPipeline":
        """Assemble from the stage outputs (every network loaded strictly: no missing / unexpected key).

        ``base`` holds ``vae/``, ``scheduler/`` and ``encoders.json`` (``models/base`` or a registry
        bundle); ``stage_json``: stage 3's ``stage.json`` (default: beside the denoiser folder).
        The landmark guider and head encoder are optional (only landmark-driven generation needs them).
        """
        from mcdm.pipelines import base_loading as loading
        from mcdm.train.base_models.unet import SD15_SCHEDULER
        from mcdm.models.encoders import HeadPoseEncoder, LandmarkGuider, load_strict
        from mcdm.models.motion_prior import PresentClipMotionPrior
        from mcdm.models.variants import MCDMDenoiser

        def folder(path, name) -> Path:
            if path is None or not Path(path).is_dir():
                raise MissingStageOutput(path or name, MODELS_LAYOUT[name][1])
            return Path(path)

        def optional(path, cls_):
            return load_strict(cls_, path).requires_grad_(False).to(device) if path and Path(path).is_dir() else None

        base, den_dir = folder(base, "base"), folder(denoiser, "denoiser")
        encoders = loading.read_encoders(base)
        if encoders.get("resolution") not in (None, params.data.resolution):
            raise McdmError(f"{base}: the base models were made at {encoders['resolution']} px, but "
                            f"data.resolution is {params.data.resolution}")
        vae = loading.load_vae(base, device)
        try:
            scheduler = DDIMScheduler.from_config(loading.load_scheduler(base).config)
        except MissingStageOutput:
            scheduler = DDIMScheduler(**SD15_SCHEDULER)
        den = load_strict(MCDMDenoiser, den_dir).requires_grad_(False).to(device)
        stage_path = Path(stage_json) if stage_json else den_dir.parent / STAGE_JSON
        stage = _read_stage_json(stage_path)
        if stage.get("variant") not in (None, den.config.model_variant):
            raise McdmError(f"{stage_path}: says variant {stage['variant']!r}, the denoiser is {den.config.model_variant!r}")
        prior = tokens = None
        if den.config.model_variant == "wo_fpc":
            from mcdm.train.stages import AudioWindowTokens

            tokens = load_strict(AudioWindowTokens, folder(audio_tokens, "audio_tokens")).to(device)
        else:
            prior = load_strict(PresentClipMotionPrior, folder(motion_prior, "motion_prior")).requires_grad_(False).to(device)
        audio_encoder = image_encoder = None
        if encoders["audio"]["backend"] == "wav2vec2":
            from transformers import Wav2Vec2Model

            path = folder(base / loading.AUDIO_ENCODER, "base")
            audio_encoder = Wav2Vec2Model.from_pretrained(str(path)).eval().to(device)
        if encoders["image"]["backend"] == "clip":
            from transformers import CLIPVisionModelWithProjection

            path = folder(base / loading.IMAGE_ENCODER, "base")
            image_encoder = CLIPVisionModelWithProjection.from_pretrained(str(path)).eval().to(device)
        provenance = {
            "source": str(den_dir), "variant": den.config.model_variant, "alpha": float(den.config.alpha),
            "params_hash": stage.get("params_hash", params.hash()),
            **{k: stage[k] for k in ("seed", "steps") if k in stage},
        }
        return cls(vae=vae, denoiser=den, scheduler=scheduler, motion_prior=prior, audio_tokens=tokens,
                   landmark_guider=optional(landmark_guider, LandmarkGuider),
                   head_encoder=optional(head_encoder, HeadPoseEncoder), audio_encoder=audio_encoder,
                   image_encoder=image_encoder,
                   **pipeline_config(params, encoders["audio"]["backend"], encoders["image"]["backend"]),
                   provenance=provenance)

    @classmethod
    def from_models_dir(cls, models_dir: str | Path, params: Params, overrides: Optional[dict] = None,
                        device: str | torch.device = "cpu") -> "MCDMPipeline":
        """The pipeline of a ``models/`` folder laid out as the DVC stages write it (``MODELS_LAYOUT``);
        ``overrides`` maps a component to another folder (e.g. an ablation's stage-3 denoiser)."""
        models_dir = Path(models_dir)
        paths = {name: models_dir / sub for name, (sub, _) in MODELS_LAYOUT.items()}
        paths.update({k: Path(v) for k, v in (overrides or {}).items()})
        return cls.from_stages(params, device=device, **paths)

    @classmethod
    def from_bundle(cls, bundle: str | Path, params: Params, device: str | torch.device = "cpu") -> "MCDMPipeline":
        """The folder stage 3 registers in MLflow (``registry_bundle``): every component in one place.
        A ``params.yaml`` in the bundle (the params that trained it) wins over ``params``."""
        from mcdm.config import load_params

        bundle = Path(bundle)
        if (bundle / "params.yaml").is_file():
            params = load_params(bundle / "params.yaml")
        paths = {name: bundle / sub for name, sub in BUNDLE_LAYOUT.items()}
        return cls.from_stages(params, stage_json=bundle / "stage3.json", device=device, **paths)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, params: Optional[Params] = None,
                        device: str | torch.device = "cpu") -> "MCDMPipeline":
        """A ``models/`` folder of this repo's stages, the bundle stage 3 registers (also as
        ``models:/name@alias`` from the MLflow registry), or a ``save_pretrained`` pipeline folder."""
        path = resolve_checkpoint(checkpoint)
        if (path / "model_index.json").is_file():
            from diffusers.utils import logging as diffusers_logging

            quiet = not diffusers_logging.is_progress_bar_enabled()
            diffusers_logging.disable_progress_bar()  # no "Loading pipeline components" bar on stderr
            try:
                pipe = cls.from_pretrained(str(path))
            except (OSError, ValueError, RuntimeError, KeyError) as err:
                raise McdmError(f"{checkpoint}: cannot load the pipeline ({str(err).splitlines()[0][:200]})") from None
            finally:
                if not quiet:
                    diffusers_logging.enable_progress_bar()
            pipe = pipe.to(device)
        else:
            params = params or Params()
            if (path / "denoiser").is_dir() and (path / "encoders.json").is_file():
                pipe = cls.from_bundle(path, params, device)
            elif (path / MODELS_LAYOUT["denoiser"][0]).is_dir() or (path / "base").is_dir():
                pipe = cls.from_models_dir(path, params, device=device)
            elif (path / "denoiser").is_dir() and (path.parent / "base").is_dir():  # a stage-3 folder
                pipe = cls.from_models_dir(path.parent, params, overrides={"denoiser": path / "denoiser"}, device=device)
            else:
                raise McdmError(f"{checkpoint}: not a models/ folder, a registered MCDM bundle or a pipeline folder")
        pipe.register_to_config(provenance={**pipe.config.provenance, "source": str(checkpoint)})
        return pipe


def clip_format(data: DataParams) -> dict:
    """The ``data`` keys a pipeline keeps: the clip format, not the data filters (``data.quality``,
    ``data.syncnet``, ``data.split``), which generation never reads."""
    return data.model_dump(mode="json", exclude=set(DATA_FILTERS))


def pipeline_config(params: Params, audio_backend: str = "logmel", image_backend: str = "dlib+vae") -> dict:
    """The pipeline's non-network config from the params the models were trained with."""
    return dict(data=clip_format(params.data), clip_frames=params.model.clip_frames,
                prior_steps=params.model.prior_inference_steps, audio_window=params.model.audio_window,
                default_steps=params.eval.steps, frame_noise_correlation=params.model.frame_noise_correlation,
                audio_backend=audio_backend, image_backend=image_backend)


def _read_stage_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise McdmError(f"{path}: not valid JSON ({err})") from None


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A local folder for ``checkpoint``; ``models:/name@alias`` (or ``/version``) is downloaded from the
    MLflow registry (``MLFLOW_TRACKING_URI``, else the project's sqlite store)."""
    spec = str(checkpoint)
    if spec.startswith("models:/"):
        import mlflow

        from mcdm.tracking.runs import tracking_uri

        uri = tracking_uri()
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            local = mlflow.artifacts.download_artifacts(artifact_uri=spec)
        except Exception as err:  # noqa: BLE001 -- any registry failure is one line for the user
            raise McdmError(f"{spec}: cannot download from the registry at {uri} "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        return Path(local)
    path = Path(spec)
    if not path.exists():
        if spec == "models" or path.name == "models":
            raise MissingStageOutput(path / MODELS_LAYOUT["denoiser"][0], MODELS_LAYOUT["denoiser"][1])
        raise McdmError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise McdmError(f"{path}: a checkpoint is a folder, not a file")
    return path


def export_pipeline(models_dir: str | Path, params: Params, out_dir: str | Path,
                    overrides: Optional[dict] = None) -> Path:
    """Save the assembled pipeline as one ``save_pretrained`` folder (what the registry should hold, so
    that ``models:/name@alias`` is a complete generator); written to ``<out>.tmp`` and renamed."""
    pipe = MCDMPipeline.from_models_dir(models_dir, params, overrides)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def build_untrained_pipeline(params: Params, seed: int = 0) -> MCDMPipeline:
    """Every component at the params' sizes with random weights (benchmarks, plumbing tests): the
    tiny VAE of ``base_models``, the variant's denoiser, the motion prior, landmark guider, head encoder."""
    from diffusers import AutoencoderKL

    from mcdm.train.base_models.unet import SD15_SCHEDULER
    from mcdm.train.base_models.vae import tiny_vae_config
    from mcdm.models.encoders import HeadPoseEncoder, LandmarkGuider
    from mcdm.models.motion_prior import PresentClipMotionPrior
    from mcdm.models.variants import build_denoiser

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config(params.base_models, params.data.resolution)).eval()
    den = build_denoiser(params).eval()
    guider = LandmarkGuider(embedding_channels=params.model.block_out_channels[0],
                            block_out_channels=tuple(params.model.landmark_guider_channels)).eval()
    prior = tokens = None
    if params.variant == "wo_fpc":
        from mcdm.train.stages import AudioWindowTokens

        tokens = AudioWindowTokens(80, params.model.audio_window)
    else:
        prior = PresentClipMotionPrior.from_params(params.model, audio_dim=80,
                                                   ref_dim=128 + 4 * params.base_models.vae_latent_channels,
                                                   landmark_dim=guider.token_dim).eval()
    pipe = MCDMPipeline(vae=vae, denoiser=den, scheduler=DDIMScheduler(**SD15_SCHEDULER), motion_prior=prior,
                        audio_tokens=tokens,
                        landmark_guider=guider, head_encoder=HeadPoseEncoder().eval(), **pipeline_config(params),
                        provenance={"source": "untrained", "variant": params.variant, "alpha": params.alpha})
    return pipe
