"""`mcdm generate` as a user meets it (issue #21): from any folder with a checkpoint that carries its own
params, on the device asked for, the face pasted back into the portrait at its resolution, the speech
as it comes (loudness, silence), a batch of pairs with the model loaded once, and a stream that plays
while it is written. A tiny untrained pipeline: these tests pin the product's plumbing, not the model."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import skimage.data
import torch
from conftest import TINY_PIPELINE, run_cli, tiny
from PIL import Image

from mcdm.config.generation import GenerationSettings
from mcdm.data.sample.speech import ESpeak
from mcdm.face.paste import FacePaster, ellipse_mask, seam_ring
from mcdm.media.io import probe, read_audio, read_frames, write_wav
from mcdm.media.loudness import integrated_loudness
from mcdm.pipelines.preprocessing import crop_portrait
from mcdm.pipelines.render import render
from mcdm.pipelines.speech import prepare_user_speech
from mcdm.train.builders import build_untrained_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PORTRAIT = skimage.data.astronaut()[:, 32:480]  # 448 wide, 512 high: not the model's square
LEAD, TRAIL = 0.5, 0.7  # seconds of silence around the speech


@pytest.fixture(scope="module")
def pipe():
    pipe = build_untrained_pipeline(tiny(TINY_PIPELINE))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def files(tmp_path_factory, pipe):
    """A portrait, quiet speech between silences, and the pipeline saved as a checkpoint folder (no params.yaml)."""
    root = tmp_path_factory.mktemp("product")
    Image.fromarray(PORTRAIT).save(root / "face.png")
    utt = ESpeak.get().synth("The quick brown fox jumps over the lazy dog.", "en", "", rate_wpm=160, pitch=50, seed=1)
    speech = np.concatenate([np.zeros(int(LEAD * 16000)), utt.audio * 0.05, np.zeros(int(TRAIL * 16000))])
    write_wav(root / "speech.wav", speech.astype(np.float32))
    (root / "notimage.png").write_text("this is a text file, not a picture\n")
    pipe.save_pretrained(root / "ckpt")
    return root


def _generate(files, out, *extra) -> list[str]:
    return ["generate", "--ref", str(files / "face.png"), "--audio", str(files / "speech.wav"), "--out", str(out),
            "--checkpoint", str(files / "ckpt"), *extra]


def _one_line_error(code: int, err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("mcdm generate: error:") and expected in lines[0], err


# ------------------------------------------------------------------------------ 1-3: any folder, device, full frame
def test_generate_from_an_empty_folder_writes_the_portrait_with_the_face_pasted_back(files, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml, no models/, no mlflow.db here
    code, out, err = run_cli(capsys, *_generate(files, "talk.mp4", "--seconds", "0.6"))
    assert code == 0, err
    info = probe(tmp_path / "talk.mp4")
    assert (info.width, info.height, info.n_frames, info.has_audio) == (448, 512, 15, True)  # the portrait's size
    assert "448x512 full frame" in out and "on cpu (CPU), float32" in out  # --device auto: no CUDA here
    frames = read_frames(tmp_path / "talk.mp4", max_frames=3).astype(np.int16)
    crop = crop_portrait(PORTRAIT, tiny(TINY_PIPELINE).data)
    l, t, r, b = crop.square
    assert r - l > 64  # the face was generated at 64 px and pasted back larger
    # away from the face the portrait is untouched (up to H.264); the face itself is generated
    assert np.abs(frames[:, -60:, :60] - PORTRAIT[-60:, :60]).mean() < 4
    cy, cx, q = (t + b) // 2, (l + r) // 2, (r - l) // 6
    assert np.abs(frames[:, cy - q:cy + q, cx - q:cx + q] - PORTRAIT[cy - q:cy + q, cx - q:cx + q]).mean() > 10
    assert list(tmp_path.iterdir()) == [tmp_path / "talk.mp4"]  # nothing else written (no mlflow.db)
    # the research output: the model's own 64 px crop
    code, out, err = run_cli(capsys, *_generate(files, tmp_path / "crop.mp4", "--seconds", "0.2", "--crop-only"))
    assert code == 0 and (probe(tmp_path / "crop.mp4").width, probe(tmp_path / "crop.mp4").height) == (64, 64), err


def test_a_registered_model_needs_the_store_named_outside_the_project(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = run_cli(capsys, *_generate(files, "talk.mp4")[:-2], "--checkpoint", "models:/mcdm-talkingface@champion")
    _one_line_error(code, err, "no MLflow store at sqlite:///")
    assert "set MLFLOW_TRACKING_URI" in err and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("option, expected", [
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    (["--device", "cpu", "--dtype", "float16"], "--dtype float16: not on the CPU"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(),
                                          reason="checks the refusal on a machine without CUDA; this one has CUDA")),
    pytest.param(["--device", "cuda:7"], "there are",
                 marks=pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() > 7,
                                          reason="needs a GPU: CUDA with fewer than 8 devices, so that cuda:7 is missing")),
])
def test_a_device_or_precision_that_cannot_work_is_one_line(files, tmp_path, capsys, option, expected):
    code, _, err = run_cli(capsys, *_generate(files, tmp_path / "out.mp4"), *option)
    _one_line_error(code, err, expected)
    assert not (tmp_path / "out.mp4").exists()


def test_half_precision_runs_the_denoiser_and_vae_in_it(files, tmp_path, capsys):
    """bfloat16 is what a CPU can run of the reduced-precision path (CUDA's float16 takes the same one)."""
    code, out, err = run_cli(capsys, *_generate(files, tmp_path / "bf16.mp4", "--seconds", "0.2", "--crop-only",
                                             "--dtype", "bfloat16", "--device", "cpu"))
    assert code == 0, err
    assert "on cpu (CPU), bfloat16" in out and probe(tmp_path / "bf16.mp4").n_frames == 5


def test_the_seam_matches_the_portrait_and_a_face_at_the_edge_pastes():
    image = skimage.data.astronaut()
    square = (140, 20, 300, 180)
    face = np.ascontiguousarray(image[20:180, 140:300])
    cast = np.clip(face.astype(np.float32) * [1.12, 0.95, 0.85] + 12, 0, 255).astype(np.uint8)  # a colour cast
    small = np.asarray(Image.fromarray(cast).resize((64, 64)))
    ring = seam_ring(ellipse_mask(160))

    def seam_error(colour_match: bool) -> float:
        out = FacePaster(image, square, colour_match=colour_match)(small)[20:180, 140:300]
        return float(np.abs(out.astype(np.float32) - face)[ring].mean())

    assert seam_error(True) < 0.7 * seam_error(False)
    mask = ellipse_mask(160)
    border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    assert mask[80, 80] > 0.99 and border.max() < 0.01  # soft inside, (next to) nothing at the square's border
    edge = FacePaster(image, (-40, -30, 120, 130))(small)  # the square reaches past the top-left corner
    assert edge.shape == image.shape and np.array_equal(edge[200:], image[200:])


# ------------------------------------------------------------------------------------------------ 4: the speech
def test_speech_is_loudness_normalised_and_its_silence_reported_or_trimmed(files, pipe, tmp_path, capsys):
    given = integrated_loudness(read_audio(files / "speech.wav"), 16000)
    assert given < -40  # a quiet recording
    code, out, err = run_cli(capsys, *_generate(files, tmp_path / "a.mp4", "--crop-only"))
    assert code == 0, err
    found = re.search(r"speech: ([\d.]+) s decoded, at (-[\d.]+) LUFS -> -23.0 LUFS \(\+[\d.]+ dB\); "
                      r"leading silence ([\d.]+) s, trailing ([\d.]+) s \(energy\)", err)
    assert found, err
    seconds, lufs, lead, trail = map(float, found.groups())
    # within 0.1 s of the silence put around the utterance (espeak adds a few ms of its own at each end)
    assert lufs == round(given, 1) and lead == pytest.approx(LEAD, abs=0.1) and trail == pytest.approx(TRAIL, abs=0.1)
    muxed = read_audio(tmp_path / "a.mp4")
    assert len(muxed) / 16000 == pytest.approx(seconds, abs=0.07)
    assert np.sqrt(np.mean(muxed[:3200] ** 2)) < 1e-3  # the track as given: it starts with its silence
    code, out, err = run_cli(capsys, *_generate(files, tmp_path / "b.mp4", "--seconds", "0.4", "--crop-only",
                                             "--trim-silence", "--silence-detector", "silero"))
    assert code == 0, err
    lead = float(re.search(r"leading silence ([\d.]+) s, trailing [\d.]+ s \(silero, trimmed\)", err).group(1))
    assert lead == pytest.approx(LEAD, abs=0.1)
    trimmed = read_audio(tmp_path / "b.mp4")[1600:6400]  # after the 0.1 s margin: speech
    assert np.sqrt(np.mean(trimmed ** 2)) > 3e-3
    # what the audio features read is at the target loudness; the muxed track keeps its level
    ready = prepare_user_speech(pipe, read_audio(files / "speech.wav"), GenerationSettings(loudness_lufs=-20.0))
    assert integrated_loudness(ready.features, 16000) == pytest.approx(-20.0, abs=0.2)
    assert integrated_loudness(ready.track, 16000) == pytest.approx(given, abs=0.2)
    silent = prepare_user_speech(pipe, np.zeros(8000, np.float32), GenerationSettings())
    assert "silent (below the -70 LUFS gate); no speech found (energy)" in silent.report.line()
    assert not silent.features.any()


# ----------------------------------------------------------------------------------------------------- 5: batch
def test_a_batch_runs_every_row_with_the_model_loaded_once_and_reports_the_failing_one(files, tmp_path, capsys):
    shutil.copy(files / "face.png", tmp_path / "face.png")
    rows = tmp_path / "rows.csv"
    rows.write_text("portrait,audio,out,seconds,seed\n"
                    f"face.png,{files / 'speech.wav'},one.mp4,0.2,\n"
                    f"{files / 'notimage.png'},{files / 'speech.wav'},two.mp4,0.2,1\n"
                    f"face.png,{files / 'speech.wav'},three.mp4,0.4,7\n")
    code, out, err = run_cli(capsys, "generate", "--batch", str(rows), "--checkpoint", str(files / "ckpt"), "--crop-only")
    assert code == 1, err
    assert "batch" in out and "2 of 3 videos written; failed: rows 2" in out
    assert "row 2 (notimage.png, speech.wav): error:" in err and "cannot read the image" in err
    assert [probe(tmp_path / n).n_frames for n in ("one.mp4", "three.mp4")] == [5, 10]
    assert not (tmp_path / "two.mp4").exists()
    assert err.count(f"{files / 'ckpt'}: variant full") == 1  # loaded once for the three rows
    # YAML, a bad value in one row; a file without a required column stops before loading anything
    (tmp_path / "rows.yaml").write_text(f"rows:\n  - {{portrait: face.png, audio: {files / 'speech.wav'}, out: y.mp4}}\n"
                                        f"  - {{portrait: face.png, audio: {files / 'speech.wav'}, out: z.mp4, seconds: -1}}\n")
    code, out, err = run_cli(capsys, "generate", "--batch", str(tmp_path / "rows.yaml"), "--checkpoint",
                          str(files / "ckpt"), "--crop-only", "--seconds", "0.2")
    assert code == 1 and "1 of 2 videos written" in out and "row 2: error: seconds: must be a finite number > 0" in err
    (tmp_path / "bad.csv").write_text("portrait,out\nface.png,x.mp4\n")
    code, _, err = run_cli(capsys, "generate", "--batch", str(tmp_path / "bad.csv"), "--checkpoint", str(files / "ckpt"))
    _one_line_error(code, err, "no column audio")


# --------------------------------------------------------------------------------------------------- 6: stream
def test_stream_writes_a_fragmented_mp4_that_plays_while_it_is_generated(files, pipe, tmp_path, capsys):
    code, out, err = run_cli(capsys, *_generate(files, tmp_path / "live.mp4", "--seconds", "2", "--crop-only",
                                             "--stream"))
    assert code == 0, err
    assert "streamed: first playable fragment after" in out and "real-time factor" in out
    data = (tmp_path / "live.mp4").read_bytes()
    assert data.count(b"moof") >= 2 and data[4:8] == b"ftyp"  # fragments: one per second of video
    info = probe(tmp_path / "live.mp4")
    assert info.n_frames == 50 and info.has_audio
    # a reader copying the file before the last frame is generated gets a playable video
    seen = {}

    def peek(done: int, total: int) -> None:
        if done == total:
            shutil.copy(tmp_path / "api.mp4", tmp_path / "partial.mp4")
            seen["frames"] = len(read_frames(tmp_path / "partial.mp4"))

    result = render(pipe, PORTRAIT, read_audio(files / "speech.wav"), tmp_path / "api.mp4", seconds=2.0, stream=True,
                    settings=GenerationSettings(crop_only=True), progress=peek)
    assert seen["frames"] >= 25  # at least the first second played before the end
    assert 0 < result.first_frame_seconds < result.generate_seconds and result.real_time_factor > 0
