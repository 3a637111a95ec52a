"""What a hostile local caller, a crafted file or an odd input can do: nothing that runs code, hangs, ends
in a traceback or leaves debris. (The engine-level cases, a pickled payload in a checkpoint and the
process-group store's address, are in tests/test_engine_security.py.)"""
from __future__ import annotations

import base64
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from conftest import TINY_PIPELINE, copy_project, tiny, tool_env
from diffusers import UNet2DConditionModel
from PIL import Image

from mcdm.config import ParamsError, dump_params, load_params
from mcdm.data.ingest import list_source
from mcdm.data.parallel import Crashed, map_videos
from mcdm.errors import McdmError
from mcdm.media.io import MediaError, probe, read_audio, write_video, write_wav
from mcdm.models.loading import load_strict
from mcdm.pipelines.preprocessing import read_image, read_speech
from mcdm.train.builders import build_untrained_pipeline


# ------------------------------------------------------------------------------------------ Prefect API
def _request(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_prefect_api_refuses_a_foreign_caller(prefect_server, served, tmp_path):
    """The request that ran a stage of another repository: a foreign Origin and Host, no secret, a
    train-all run whose project_dir points elsewhere. Refused; and even a caller holding the secret
    cannot aim a flow at another folder (the flows have no such parameter)."""
    api, home, _, port = prefect_server
    project, env = served
    other = tmp_path / "other"  # another DVC repo whose stage would leave a marker if it ran
    other.mkdir()
    (other / "dvc.yaml").write_text("stages:\n  sample_data:\n    cmd: touch PWNED\n    outs: [PWNED]\n")
    hostile = {"Origin": "http://evil.example", "Host": "evil.example"}
    run = {"parameters": {"project_dir": str(other), "target": "sample_data"}}
    # no auth: every API call is refused, whatever the method, origin or host
    assert _request(f"{api}/deployments/filter", "POST", {}, hostile) in (401, 403)
    assert _request(f"{api}/flows/filter", "POST", {}, hostile) in (401, 403)
    assert _request(f"{api}/version", headers=hostile) == 401
    # a browser on a foreign origin is not even allowed to ask (CORS preflight)
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    assert _request(f"{api}/flows/filter", "OPTIONS", None, preflight) == 400
    # the same calls with the secret are answered: the refusals above are the missing secret's
    secret = {"Authorization": "Basic " + base64.b64encode((home / "auth").read_text().strip().encode()).decode()}
    assert _request(f"{api}/version", headers=secret) == 200
    # a caller holding the secret finds no parameter that aims a flow at another folder
    script = f"""
import json, sys, time
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    d = client.read_deployment_by_name("train-all/local")
    assert "project_dir" not in json.dumps(d.parameter_openapi_schema), d.parameter_openapi_schema
    fr = client.create_flow_run_from_deployment(d.id, parameters={json.dumps(run["parameters"])})
    for _ in range(240):
        state = client.read_flow_run(fr.id).state
        if state.is_final():
            break
        time.sleep(1)
    print(state.type.value)
"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] in ("CRASHED", "FAILED"), done.stdout
    assert not (other / "PWNED").exists() and not (project / "PWNED").exists()


def test_prefect_secret_is_private(prefect_server):
    _, home, _, _ = prefect_server
    assert stat.S_IMODE((home / "auth").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert (home / "auth").read_text().startswith("mcdm:") and len((home / "auth").read_text().strip()) > 40


# ------------------------------------------------------------------------------------------ odd files
@pytest.fixture
def fifo_folder(tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    write_video(src / "ok.mp4", np.zeros((10, 32, 32, 3), np.uint8), fps=25.0)
    os.mkfifo(src / "x.mp4")
    return src


def test_a_fifo_named_like_a_video_is_rejected_without_being_opened(fifo_folder):
    started = time.time()
    candidates, rejects = list_source(fifo_folder)
    assert [c.file for c in candidates] == ["ok.mp4"]
    assert [(r["file"], r["reason"].split(":")[0]) for r in rejects] == [("x.mp4", "not_regular_file")]
    with pytest.raises(MediaError, match="not a regular file"):
        probe(fifo_folder / "x.mp4")  # media reading refuses it too, at once
    assert time.time() - started < 5


def _block_forever(path):
    with open(path, "rb"):  # a FIFO nobody writes to: open(2) blocks
        return "never"


def test_a_stuck_item_becomes_a_timeout_reject_and_the_map_goes_on(fifo_folder):
    started = time.time()
    results = map_videos(_block_forever, [str(fifo_folder / "x.mp4"), str(fifo_folder / "ok.mp4")], timeout=2.0)
    assert isinstance(results[0], Crashed) and results[0].code == "timeout"
    assert results[1] == "never"  # the regular file opens and returns
    assert time.time() - started < 15


def _png_header(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and IHDR claiming ``width`` x ``height``, and no pixel data (69 bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))
    return path


@pytest.mark.parametrize("side", [20000, 7000])
def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    with pytest.raises(Exception) as err:
        read_image(_png_header(tmp_path / "bomb.png", side, side))
    assert type(err.value).__name__ == "McdmError" and "bomb.png" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_audio_is_decoded_only_as_far_as_it_is_used(tmp_path):
    wav = write_wav(tmp_path / "long.wav", np.random.default_rng(0).normal(0, 0.1, 120 * 16000).astype(np.float32))
    tracemalloc.start()
    part = read_audio(wav, end=1.0)
    _, peak_part = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    whole = read_audio(wav)
    _, peak_whole = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(part) == 16000 and len(whole) == 120 * 16000
    np.testing.assert_array_equal(part, whole[:16000])
    assert peak_part < peak_whole / 20, (peak_part, peak_whole)
    assert len(read_speech(wav, seconds=2.0)) == 3 * 16000  # what --seconds 2 decodes: 2 s and 1 s of margin


# ------------------------------------------------------------------------------------------ mcdm generate
@pytest.fixture(scope="module")
def generate_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    params = tiny(TINY_PIPELINE)
    (root / "params.yaml").write_text(dump_params(params))
    build_untrained_pipeline(params).save_pretrained(root / "ckpt")
    Image.fromarray(skimage.data.astronaut()).save(root / "face.png")
    write_wav(root / "speech.wav", (0.1 * np.sin(np.arange(30 * 16000) / 40.0)).astype(np.float32))
    return root


def _generate(root: Path, *args: str, checkpoint: str | None = None, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = ["mcdm", "--params", str(root / "params.yaml"), "generate", "--ref", str(root / "face.png"),
           "--audio", str(root / "speech.wav"), "--checkpoint", checkpoint or str(root / "ckpt"), *args]
    if kwargs.get("background"):
        # SIGINT as a terminal delivers it: a shell's background job (`... &`) inherits SIGINT ignored, and
        # Python then keeps ignoring it (no KeyboardInterrupt), which is right for the CLI but not what we test
        return subprocess.Popen(cmd, cwd=root, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=root, env=tool_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("seconds", ["nan", "0", "-1", "inf", "ten"])
def test_generate_refuses_bad_seconds_before_loading_anything(generate_files, seconds):
    done = _generate(generate_files, "--out", str(generate_files / "out.mp4"), "--seconds", seconds,
                     checkpoint="/nonexistent/ckpt")  # refused before the checkpoint is even looked at
    assert done.returncode == 2 and "argument --seconds" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "nonexistent" not in done.stderr


def test_generate_checks_the_output_path_first(generate_files, tmp_path):
    for out, words in ((tmp_path, "is a folder"), (tmp_path / "nowhere" / "talk.mp4", "does not exist")):
        done = _generate(generate_files, "--out", str(out), "--seconds", "1", checkpoint="/nonexistent/ckpt")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and words in lines[0], done.stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_generate_interrupted_leaves_no_temporary_file(generate_files, tmp_path, sig, code):
    out = tmp_path / "talk.mp4"
    proc = _generate(generate_files, "--out", str(out), "--seconds", "30", background=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob(".talk.tmp*")):  # writing has started
        time.sleep(0.2)
    assert list(tmp_path.glob(".talk.tmp*")), "generation never started writing"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ params
@pytest.mark.parametrize("text, words", [
    ("data:\n  fps: .inf\n", "data.fps: Input should be a finite number"),
    ("seed: '3'\n", "seed: Input should be a valid integer"),
    ("train:\n  stage1:\n    steps: 2.5\n", "train.stage1.steps: Input should be a valid integer"),
    ("", "the file is empty"),
])
def test_params_are_strict(tmp_path, text, words):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=words.replace(".", r"\.")):
        load_params(tmp_path / "params.yaml")


def test_numbers_are_read_as_yaml_1_2_writes_them(tmp_path):
    """``1e-5`` is a number (PyYAML alone reads YAML 1.1's string; DVC's ``-S`` writes such numbers)."""
    (tmp_path / "params.yaml").write_text("train:\n  stage1:\n    lr: 1e-5\nbase_models:\n  vae_kl_weight: 2E-6\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.train.stage1.lr == 1e-5 and params.base_models.vae_kl_weight == 2e-6


def test_an_unknown_top_level_key_stops_dvc_repro(tmp_path):
    """No stage reads a key nobody knows, so only the params_check stage (it depends on the whole
    file) makes `dvc repro` see it."""
    proj = copy_project(tmp_path / "proj")
    env = tool_env()
    assert subprocess.run(["dvc", "repro", "params_check"], cwd=proj, env=env, capture_output=True).returncode == 0
    params = proj / "params.yaml"
    params.write_text(params.read_text() + "colour: blue\n")
    done = subprocess.run(["dvc", "repro", "params_check"], cwd=proj, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "params.yaml: colour: unknown key" in done.stdout + done.stderr


def test_pickled_weights_are_refused_without_unpickling(tmp_path):
    """#18.2: every diffusers folder loads with ``use_safetensors=True``: a ``.bin`` (a pickle, which may
    carry code) beside the config is refused by name, never unpickled."""
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    unet.save_pretrained(tmp_path / "safe")
    assert load_strict(UNet2DConditionModel, tmp_path / "safe") is not None
    unet.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(McdmError, match="pickled"):
        load_strict(UNet2DConditionModel, tmp_path / "pickled")
