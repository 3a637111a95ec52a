"""Long-term talking-face generation (paper Sec. 3, "Inference"): a diffusers ``DiffusionPipeline``.

    pipe = load_pipeline("models", params)     # mcdm.pipelines.loading: a models/ folder, a bundle or a pipeline folder
    out = pipe(portrait_rgb, speech_16k)        # arrays in, (T, S, S, 3) uint8 frames out
    generate_video(pipe, "face.png", "speech.wav", "talk.mp4")   # mcdm.pipelines.video: files in, mp4 out

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

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from einops import rearrange, repeat
from tqdm.auto import tqdm

from mcdm.config import DATA_FILTERS, DataParams
from mcdm.errors import McdmError
from mcdm.face.geometry import head_pose_from_landmarks
from mcdm.face.heatmaps import render_landmark_heatmaps
from mcdm.models.audio_features import LogMelAudio, Wav2Vec2Audio
from mcdm.models.frame_noise import frame_correlated_noise
from mcdm.models.identity import ClipIdentity, DlibVaeIdentity
from mcdm.models.vae import encode_latents, to_uint8
from mcdm.pipelines.preprocessing import crop_portrait

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
            if self.config.audio_backend == "wav2vec2":
                if self.audio_encoder is None:
                    raise McdmError("pipeline: audio backend wav2vec2 but no audio_encoder component")
                self._audio = Wav2Vec2Audio.from_model(self.audio_encoder)
            elif self.config.audio_backend == "logmel":
                self._audio = LogMelAudio()
            else:
                raise McdmError(f"pipeline: unknown audio backend {self.config.audio_backend!r}")
        return self._audio

    @property
    def identity_backend(self):
        """Callable ``(rgb crop, landmarks (68, 2) or None) -> (E,)``: the reference identity embedding."""
        if self._identity is None:
            if self.config.image_backend == "clip":
                if self.image_encoder is None:
                    raise McdmError("pipeline: image backend clip but no image_encoder component")
                self._identity = ClipIdentity.from_model(self.image_encoder)
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
    def prepare_driving(self, landmarks: np.ndarray, n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 68, 2) crop-pixel driving landmarks -> (1, n_frames, 68, 2) and their head pose (1, n_frames, 6)."""
        marks = np.asarray(landmarks, np.float32)
        if marks.ndim != 3 or marks.shape[1:] != (68, 2) or len(marks) < n_frames:
            raise McdmError(f"landmarks: expected ({n_frames}+, 68, 2) crop-pixel landmarks, got {marks.shape}")
        marks = marks[:n_frames]
        pose = head_pose_from_landmarks(marks, self.data_params.resolution)
        return torch.from_numpy(np.ascontiguousarray(marks))[None], torch.from_numpy(np.asarray(pose, np.float32))[None]

    def prepare_speech(self, audio: np.ndarray, seconds: Optional[float] = None) -> tuple[np.ndarray, int]:
        """16 kHz mono speech -> (the segment to generate, its length in frames): the first ``seconds``
        of it (default: all), padded with silence to a whole number of frames."""
        rate = int(self.data_params.audio_rate)
        audio = np.asarray(audio, np.float32).reshape(-1)
        if audio.size == 0:
            raise McdmError("audio: empty")
        duration = audio.size / rate
        if seconds is not None:
            if not math.isfinite(seconds) or seconds <= 0:
                raise McdmError(f"--seconds: must be a finite number > 0 (got {seconds})")
            if seconds > duration + 0.5 / self.fps:
                raise McdmError(f"--seconds {seconds:g} is longer than the audio ({duration:.2f} s)")
            duration = seconds
        n_frames = max(1, int(round(duration * self.fps)))
        n_samples = int(round(n_frames / self.fps * rate))
        segment = audio[:n_samples]
        return np.pad(segment, (0, max(0, n_samples - segment.size))), n_frames

    @torch.no_grad()
    def iter_frames(
        self,
        crop: np.ndarray,
        audio: np.ndarray,
        n_frames: int,
        ref_landmarks: Optional[np.ndarray] = None,
        landmarks: Optional[np.ndarray] = None,
        num_inference_steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        eta: float = 0.0,
    ) -> Iterator[np.ndarray]:
        """Frames (S, S, 3) uint8 of one portrait crop speaking ``audio``, one at a time as clips finish
        (a video of any length needs the memory of one clip), with a progress bar in frames.

        ``crop``: the ``data.resolution`` talking-head crop (:func:`~mcdm.pipelines.preprocessing.crop_portrait`),
        ``ref_landmarks`` its (68, 2) landmarks; ``audio``: the 16 kHz segment of ``n_frames`` frames
        (:meth:`prepare_speech`); ``landmarks``: optional (n_frames+, 68, 2) crop-pixel driving landmarks.
        """
        ref_latent, ref_embedding = self.encode_reference(
            np.asarray(crop, np.uint8)[None], None if ref_landmarks is None else np.asarray(ref_landmarks)[None])
        feats = self.audio_features(audio, n_frames)[None]
        lm = pose = None
        if landmarks is not None:
            lm, pose = self.prepare_driving(landmarks, n_frames)
        clips = self.iter_clips(ref_latent, ref_embedding, feats, landmarks=lm, head_pose=pose,
                                num_inference_steps=num_inference_steps, generator=generator, eta=eta)
        with self.progress_bar(total=n_frames) as bar:
            for clip in clips:
                bar.update(clip.frames.shape[1])
                yield from clip.frames[0]

    @torch.no_grad()
    def __call__(
        self,
        ref_image: np.ndarray,
        audio: np.ndarray,
        seconds: Optional[float] = None,
        landmarks: Optional[np.ndarray] = None,
        num_inference_steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        crop_face: bool = True,
        ref_landmarks: Optional[np.ndarray] = None,
        eta: float = 0.0,
    ) -> MCDMPipelineOutput:
        """Generate a talking-face video of one portrait (arrays in, frames out; files in and an mp4
        out: :func:`mcdm.pipelines.video.generate_video`).

        Args:
            ref_image: portrait, RGB uint8 (H, W, 3); the face is found and cropped as the faces stage
                crops training clips. With ``crop_face=False`` it must already be a ``data.resolution``
                crop (then ``ref_landmarks`` (68, 2) help the identity encoder).
            audio: speech, 16 kHz mono float array.
            seconds: generate only the first ``seconds`` of the audio (default: all of it).
            landmarks: optional (T, 68, 2) crop-pixel driving landmarks.
            num_inference_steps: denoising steps per clip (default ``default_steps`` = ``eval.steps``).
            generator: torch generator (noise of the prior and of the denoiser).
        """
        segment, n_frames = self.prepare_speech(audio, seconds)
        crop = np.asarray(ref_image, np.uint8)
        if crop_face:
            portrait = crop_portrait(crop, self.data_params)
            crop, ref_landmarks = portrait.image, portrait.landmarks
        video = np.stack(list(self.iter_frames(crop, segment, n_frames, ref_landmarks, landmarks,
                                               num_inference_steps, generator, eta)))
        return MCDMPipelineOutput(frames=video, path=None, n_frames=len(video), fps=self.fps)

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
            lm = torch.as_tensor(np.asarray(landmarks, np.float32)[:, :n_frames])
            pose = torch.stack([torch.as_tensor(head_pose_from_landmarks(m, self.data_params.resolution)) for m in lm.numpy()])
        out = []
        with tqdm(total=n_frames * len(crops), desc="generating", unit="frame", disable=not progress) as bar:
            for clip in self.iter_clips(ref_latent, ref_embedding, feats, landmarks=lm, head_pose=pose,
                                        num_inference_steps=num_inference_steps, generator=generator):
                out.append(clip.frames)
                bar.update(clip.frames.shape[0] * clip.frames.shape[1])
        return np.concatenate(out, axis=1)


def clip_format(data: DataParams) -> dict:
    """The ``data`` keys a pipeline keeps: the clip format, not the data filters (``data.quality``,
    ``data.syncnet``, ``data.split``), which generation never reads."""
    return data.model_dump(mode="json", exclude=set(DATA_FILTERS))
