"""`mcdm demo` in a real browser (issue #21 point 7): the Gradio app on 127.0.0.1 with a tiny untrained
pipeline, opened in headless Chromium (Debian's chromium + chromedriver, driven by selenium). Uploads a
portrait and speech, waits for the video, plays it and checks it has sound and the portrait's size;
then a text file as the portrait shows the one-line error in the page. With MCDM_DOCS_SCREENSHOTS=1 the
screenshots go to docs/ (README shows them), else to the test's folder."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import requests
import skimage.data
import torch
from conftest import (
    TINY_PIPELINE,
    browser,
    docs_screenshot,
    free_port,
    run_cli,
    screenshot_on_failure,
    stop_session,
    tiny,
    tool_env,
    wait_for_http,
)
from PIL import Image

from mcdm.data.sample.speech import ESpeak
from mcdm.demo import DemoSettings, build, launch
from mcdm.media.io import probe, write_wav
from mcdm.train.builders import build_untrained_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(URL of the running demo, folder with face.png, speech.wav and notimage.png)."""
    root = tmp_path_factory.mktemp("demo")
    pipe = build_untrained_pipeline(tiny(TINY_PIPELINE))
    pipe.save_pretrained(root / "ckpt")
    Image.fromarray(skimage.data.astronaut()[:, 32:480]).save(root / "face.png")  # 448 x 512
    utt = ESpeak.get().synth("Hello, this is the demo speaking.", "en", "", rate_wpm=160, pitch=50, seed=1)
    write_wav(root / "speech.wav", np.asarray(utt.audio, np.float32))
    (root / "notimage.png").write_text("this is a text file, not a picture\n")
    app = build(DemoSettings(checkpoint=str(root / "ckpt"), seconds=1.0, out_dir=root / "out"))
    (root / "out").mkdir()
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", root
    finally:
        app.close()


def _shot(driver, tmp_path, name: str) -> None:
    driver.execute_script("window.scrollTo(0, 0);")
    driver.save_screenshot(str(tmp_path / name))
    docs_screenshot(tmp_path / name)


def test_demo_generates_a_video_that_plays_with_sound_and_shows_bad_input_in_one_line(demo, tmp_path):
    url, root = demo
    driver = browser("1280,1250", "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    with screenshot_on_failure(driver, tmp_path):
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#portrait input[type=file]")))
        upload.send_keys(str(root / "face.png"))
        driver.find_element(By.CSS_SELECTOR, "#speech input[type=file]").send_keys(str(root / "speech.wav"))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#portrait img")))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#speech audio, #speech .waveform-container")))
        assert str(root / "ckpt") in driver.find_element(By.CSS_SELECTOR, "#checkpoint input").get_attribute("value")
        driver.find_element(By.ID, "generate").click()
        video = WebDriverWait(driver, 90).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#video video")))
        driver.execute_script("arguments[0].muted = false; arguments[0].play();", video)
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "const v = arguments[0]; return v.readyState >= 2 && v.duration > 0 && v.currentTime > 0.3", video))
        state = driver.execute_script("const v = arguments[0]; return {w: v.videoWidth, h: v.videoHeight, "
                                      "duration: v.duration, audio: v.webkitAudioDecodedByteCount, src: v.currentSrc}",
                                      video)
        assert (state["w"], state["h"]) == (448, 512) and state["duration"] == pytest.approx(1.0, abs=0.1), state
        assert state["audio"] > 0, state  # Chromium decoded the sound track
        (tmp_path / "served.mp4").write_bytes(requests.get(state["src"], timeout=30).content)
        info = probe(tmp_path / "served.mp4")
        assert (info.width, info.height, info.n_frames, info.has_audio) == (448, 512, 25, True)
        report = driver.find_element(By.CSS_SELECTOR, "#report textarea").get_attribute("value")
        assert "448x512 full frame" in report and "LUFS" in report
        _shot(driver, tmp_path, "demo.png")

        # bad input: a text file as the portrait is the one-line error, in the page
        driver.get(url)
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#portrait input[type=file]")))
        upload.send_keys(str(root / "notimage.png"))
        driver.find_element(By.CSS_SELECTOR, "#speech input[type=file]").send_keys(str(root / "speech.wav"))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#speech audio, #speech .waveform-container")))
        driver.find_element(By.ID, "generate").click()
        expected = "portrait notimage.png: cannot read the image"
        WebDriverWait(driver, 30).until(lambda d: expected in d.find_element(By.TAG_NAME, "body").text)
        line = next(t for t in driver.find_element(By.TAG_NAME, "body").text.splitlines() if expected in t)
        assert line.endswith("a PNG or JPEG is expected"), line
        _shot(driver, tmp_path, "demo_error.png")


def test_mcdm_demo_serves_on_loopback_until_stopped(demo, tmp_path, capsys):
    """The command: a bad port is one line; `mcdm demo` answers on 127.0.0.1 and stops on SIGTERM (by its pid)."""
    _, root = demo
    code, _, err = run_cli(capsys, "demo", "--checkpoint", root / "ckpt", "--port", "70000")
    assert code == 2 and err.strip() == "mcdm demo: error: --port 70000: a port is 1 to 65535", err
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "demo", "--checkpoint", root / "ckpt", "--device", "cuda")
        assert code == 2 and err.strip().startswith("mcdm demo: error: --device cuda: CUDA is not available here"), err
    port = free_port()
    with open(tmp_path / "demo.log", "wb") as log:
        server = subprocess.Popen(["mcdm", "demo", "--checkpoint", str(root / "ckpt"), "--port", str(port)],
                                  cwd=tmp_path, env=tool_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            page = wait_for_http(f"http://127.0.0.1:{port}/", server, tmp_path / "demo.log")
            assert page.status_code == 200 and "MCDM talking face" in page.text
            listening = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
            local = {row[1] for row in listening if row[3] == "0A"}  # LISTEN sockets, hex address:port
            assert f"0100007F:{port:04X}" in local and f"00000000:{port:04X}" not in local  # 127.0.0.1 only
        finally:
            stop_session(server, timeout=20)
    assert f"demo at http://127.0.0.1:{port}/" in (tmp_path / "demo.log").read_text()
