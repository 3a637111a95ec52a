"""Long-term generation: the clip-after-clip loop (archived window, MTA memory carried at constant size),
the reference crop, `mcdm generate` (mp4 with the audio muxed) and its one-line errors on bad input.

Untrained (random) tiny components: these tests pin the plumbing; the maths of each module is pinned
by its own tests."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from conftest import TINY_PIPELINE, run_cli, tiny
from PIL import Image

from mcdm.config import Params, dump_params
from mcdm.media.io import probe, read_audio, write_video, write_wav
from mcdm.pipelines.mcdm import MCDMPipeline
from mcdm.pipelines.preprocessing import crop_portrait, driving_landmarks
from mcdm.pipelines.video import generate_video
from mcdm.train.builders import build_untrained_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F, A = 4, 2  # clip frames, archived frames

@pytest.fixture(scope="module")
def params() -> Params:
    return tiny(TINY_PIPELINE)


@pytest.fixture(scope="module")
def pipe(params) -> MCDMPipeline:
    pipe = build_untrained_pipeline(params)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def files(tmp_path_factory, params, pipe):
    """A portrait, 1 s of speech-like audio, a params.yaml and the pipeline saved as a checkpoint folder."""
    root = tmp_path_factory.mktemp("generate")
    Image.fromarray(skimage.data.astronaut()).save(root / "face.png")
    t = np.arange(16000) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    write_wav(root / "speech.wav", speech)
    (root / "params.yaml").write_text(dump_params(params))
    pipe.save_pretrained(root / "ckpt")
    return root


def test_reference_crop_frames_the_face_like_the_faces_stage(params):
    image = skimage.data.astronaut()
    crop = crop_portrait(image, params.data)
    side = params.data.resolution
    assert crop.image.shape == (side, side, 3) and crop.image.dtype == np.uint8 and crop.n_faces == 1
    assert ((crop.landmarks >= 0) & (crop.landmarks < side)).all()
    # the square is crop_scale x the face box: the face box spans side / crop_scale crop pixels, centred
    l, t, r, b = crop.face_box
    face_in_crop = (r - l) * side / round(params.data.crop_scale * min(r - l, b - t))
    assert face_in_crop == pytest.approx(side / params.data.crop_scale, rel=0.02)
    assert np.abs(crop.landmarks.mean(0) - side / 2).max() < 0.15 * side


def test_clips_carry_archived_window_and_constant_memory(pipe, params):
    """Archived window = reference at first, then the latest generated latents; MTA memory of the previous
    clip read at every step of the next one; the carried state has the same size after every clip."""
    crop = crop_portrait(skimage.data.astronaut(), params.data)
    ref_latent, ref_emb = pipe.encode_reference(crop.image[None], crop.landmarks[None])
    n_frames = 3 * F - 1  # 3 clips, the last one shorter
    audio = pipe.audio_features(np.random.default_rng(0).normal(0, 0.1, n_frames * 640).astype(np.float32), n_frames)
    archived_in, memory_in = [], []
    hooks = [
        pipe.denoiser.archived_prior.register_forward_pre_hook(lambda m, args: archived_in.append(args[1].clone())),
        pipe.denoiser.register_forward_pre_hook(lambda m, args, kw: memory_in.append(kw.get("memory_state")),
                                                with_kwargs=True),
    ]
    try:
        clips = list(pipe.iter_clips(ref_latent, ref_emb, audio[None], num_inference_steps=2,
                                     generator=torch.Generator().manual_seed(0)))
    finally:
        for h in hooks:
            h.remove()
    side = params.data.resolution
    assert [c.frames.shape for c in clips] == [(1, F, side, side, 3)] * 2 + [(1, F - 1, side, side, 3)]
    assert [c.start for c in clips] == [0, F, 2 * F]
    # archived window: the reference repeated for clip 0, then the last A latents of the previous clip
    assert len(archived_in) == 3
    torch.testing.assert_close(archived_in[0], ref_latent[:, None].expand(-1, A, -1, -1, -1))
    for k in (1, 2):
        expected = clips[k - 1].latents[:, :, -A:].permute(0, 2, 1, 3, 4)
        torch.testing.assert_close(archived_in[k], expected)
        torch.testing.assert_close(clips[k - 1].archived_latents, expected)
    # memory: none in clip 0; in clip k every step reads what clip k-1 returned
    assert memory_in[:2] == [None, None]
    for k in (1, 2):
        for state in memory_in[2 * k:2 * k + 2]:
            assert state is clips[k - 1].memory_state
    # constant memory: the carried state has the same keys, shapes and bytes after every clip
    def carried(c):
        return {name: tuple(v.shape) for name, v in c.memory_state.items()}, tuple(c.archived_latents.shape)

    assert carried(clips[0]) == carried(clips[1]) == carried(clips[2])
    assert all(v.shape[0] == 1 and v.ndim == 3 for v in clips[0].memory_state.values())
    # same seed, same video: generation is deterministic
    again = next(pipe.iter_clips(ref_latent, ref_emb, audio[None], num_inference_steps=2,
                                 generator=torch.Generator().manual_seed(0)))
    np.testing.assert_array_equal(again.frames, clips[0].frames)


def test_long_audio_is_encoded_in_chunks_like_one_pass(pipe):
    """Audio features of long speech come chunk by chunk (constant memory) and equal the one-pass features."""
    audio = np.random.default_rng(1).normal(0, 0.1, 6 * 16000).astype(np.float32)
    one_pass = pipe.audio_features(audio, 150, chunk_seconds=100.0)
    chunked = pipe.audio_features(audio, 150, chunk_seconds=1.0, context_seconds=0.5)
    assert one_pass.shape == chunked.shape == (150, 80)
    torch.testing.assert_close(chunked, one_pass, atol=1e-4, rtol=1e-4)


def test_landmark_video_drives_generation(pipe, params, tmp_path):
    """--landmarks: the driving video is tracked like the faces stage (landmarks in crop pixels)."""
    face = skimage.data.astronaut()[:320, 60:380]
    frames = [np.roll(face, (0, 2 * i), axis=(0, 1)) for i in range(8)]
    write_video(tmp_path / "drive.mp4", np.stack(frames), fps=params.data.fps)
    track = driving_landmarks(tmp_path / "drive.mp4", params.data, 8)
    marks, pose = pipe.prepare_driving(track.landmarks, 8)
    side = params.data.resolution
    assert marks.shape == (1, 8, 68, 2) and pose.shape == (1, 8, 6)
    assert ((marks > -0.1 * side) & (marks < 1.1 * side)).all()
    out = pipe(skimage.data.astronaut(), np.zeros(16000, np.float32) + 0.01, seconds=8 / params.data.fps,
               landmarks=track.landmarks, generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (8, side, side, 3)
    video = generate_video(pipe, skimage.data.astronaut(), np.zeros(16000, np.float32) + 0.01, tmp_path / "out.mp4",
                           seconds=8 / params.data.fps, landmarks=tmp_path / "drive.mp4", seed=0)
    assert probe(video.path).n_frames == 8


def test_generate_cli_writes_mp4_with_audio(files, capsys):
    out = files / "talk.mp4"
    code, stdout, stderr = run_cli(capsys, "--params", str(files / "params.yaml"), "generate", "--ref",
                                    str(files / "face.png"), "--audio", str(files / "speech.wav"), "--out", str(out),
                                    "--checkpoint", str(files / "ckpt"), "--seconds", "0.6")
    assert code == 0, stderr
    info = probe(out)
    assert info.has_audio and info.n_frames == 15 and (info.width, info.height) == (512, 512)  # the portrait's
    audio = read_audio(out)
    assert abs(len(audio) / 16000 - 0.6) < 0.08  # the first 0.6 s of the input audio, muxed (AAC)
    assert 0.1 < np.sqrt(np.mean(audio**2)) < 0.3  # the input's RMS (~0.19), not silence
    assert "wrote" in stdout and "15 frames" in stdout


def _bad(files, tmp_path, case: str) -> list[str]:
    args = {"ref": files / "face.png", "audio": files / "speech.wav", "checkpoint": files / "ckpt"}
    if case == "unreadable image":
        (tmp_path / "face.png").write_text("not an image")
        args["ref"] = tmp_path / "face.png"
    elif case == "no face":
        ramp = np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (256, 1, 3))
        Image.fromarray(ramp).save(tmp_path / "wall.png")
        args["ref"] = tmp_path / "wall.png"
    elif case == "audio does not decode":
        (tmp_path / "speech.wav").write_bytes(np.random.default_rng(0).bytes(4000))
        args["audio"] = tmp_path / "speech.wav"
    elif case == "empty audio":
        write_wav(tmp_path / "silence.wav", np.zeros(0, np.float32))
        args["audio"] = tmp_path / "silence.wav"
    elif case == "other variant":
        other = build_untrained_pipeline(tiny(TINY_PIPELINE, variant="wo_fa"))
        other.save_pretrained(tmp_path / "wo_fa_ckpt")
        args["checkpoint"] = tmp_path / "wo_fa_ckpt"
    return ["--params", str(files / "params.yaml"), "generate", "--ref", str(args["ref"]), "--audio", str(args["audio"]),
            "--out", str(tmp_path / "out.mp4"), "--checkpoint", str(args["checkpoint"])]


@pytest.mark.parametrize("case, expected", [
    ("unreadable image", "face.png: cannot read the image"),
    ("no face", "wall.png: no face found in the image"),
    ("audio does not decode", "speech.wav: audio does not decode"),
    ("empty audio", "silence.wav: the audio is empty"),
    ("other variant", "is variant 'wo_fa', but params.variant is 'full'"),
])
def test_generate_bad_input_is_one_line_error(files, tmp_path, capsys, case, expected):
    code, stdout, stderr = run_cli(capsys, *_bad(files, tmp_path, case))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcdm generate: error:") and expected in lines[0], stderr
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_initial_noise_of_a_clip_is_frame_correlated_as_in_training(pipe, params, rho):
    """The pipeline's config carries model.frame_noise_correlation; each clip's initial latents follow
    it (rho = 1: one field for every frame of the clip; rho = 0: independent frames)."""
    assert pipe.config.frame_noise_correlation == params.model.frame_noise_correlation
    crop = crop_portrait(skimage.data.astronaut(), params.data)
    ref_latent, ref_emb = pipe.encode_reference(crop.image[None], crop.landmarks[None])
    audio = pipe.audio_features(np.zeros(F * 640, np.float32), F)
    first_input = []
    hook = pipe.denoiser.register_forward_pre_hook(lambda m, args: first_input.append(args[0].clone()))
    try:
        next(pipe.iter_clips(ref_latent, ref_emb, audio[None], num_inference_steps=1, frame_noise_correlation=rho,
                             generator=torch.Generator().manual_seed(0)))
    finally:
        hook.remove()
    z = first_input[0]  # (1, C, F, h, w), scaled by init_noise_sigma (1 for DDIM)
    same = torch.allclose(z[:, :, 1:], z[:, :, :1].expand_as(z[:, :, 1:]))
    assert same == (rho == 1.0)
