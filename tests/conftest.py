"""Shared fixtures: a temporary copy of the project (its own git + DVC repo) and free ports."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see src/mcdm/__init__.py

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# The tiny configurations of the unit tests, in one place (channels 16/32, 4-frame clips, 2 archived frames).
# TINY_PIPELINE: an MCDM pipeline that generates in well under a second a clip (pipeline, evaluate tests);
# TINY_TRAINING: the three training stages in seconds (stage tests, the GPU smoke's CPU run).
TINY_PIPELINE = {
    "model": {"clip_frames": 4, "archived_frames": 2, "block_out_channels": [16, 32], "norm_num_groups": 8,
              "prior_inference_steps": 2, "prior_layers": 1},
    "base_models": {"vae_block_out_channels": [8, 8, 8, 8]},
    "eval": {"steps": 2},
}
TINY_TRAINING = {
    "model": {"block_out_channels": [16, 32], "norm_num_groups": 16, "attention_head_dim": 2, "prior_dim": 32,
              "clip_frames": 4, "archived_frames": 2, "num_queries": 2, "patch_size": 2, "mta_features": 8,
              "prior_layers": 1, "prior_heads": 4, "lip_dim": 8, "expression_dim": 6,
              "landmark_guider_channels": [8, 8, 16, 16], "prior_inference_steps": 2},
    "train": {"checkpoint_every": 2,
              "stage1": {"steps": 4, "batch_size": 4, "lr": 1e-3},
              "stage2": {"steps": 30, "batch_size": 4, "lr": 1e-3},
              "stage3": {"steps": 4, "batch_size": 2, "lr": 1e-3, "clips_per_run": 2}},
    "tracking": {"system_metrics": False},
}


def tiny(base: dict, **overrides):
    """Validated params of a tiny configuration with ``overrides`` merged in (sections as dicts)."""
    from mcdm.config import Params, deep_merge

    return Params.model_validate(deep_merge(base, overrides))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``mcdm ARGV`` run in this process."""
    from mcdm import cli

    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser(window: str = "1400,1000", *extra: str):
    """Headless Debian chromium driven by selenium (skips, saying why, where it is not installed)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium + chromium-driver; `make test` installs them with apt-get "
                    "when run as root, and could not here")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}", *extra):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@contextlib.contextmanager
def screenshot_on_failure(driver, folder: Path):
    """The driver's page saved to ``folder/failure.png`` when the block fails; the driver quit after it."""
    try:
        yield driver
    except Exception:
        driver.save_screenshot(str(folder / "failure.png"))
        print("screenshot of the failing page:", folder / "failure.png")
        raise
    finally:
        driver.quit()


def docs_screenshot(shot: Path) -> None:
    """With MCDM_DOCS_SCREENSHOTS=1, ``shot`` becomes docs/<its name> (256 colours: README pictures stay
    small); a plain test run leaves docs/ alone."""
    if os.environ.get("MCDM_DOCS_SCREENSHOTS") == "1":
        from PIL import Image

        with Image.open(shot) as img:
            img.convert("RGB").quantize(256).save(ROOT / "docs" / shot.name, optimize=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_env(**extra: str) -> dict[str, str]:
    """The environment a user has with the venv active (mcdm, dvc, deepspeed on PATH)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def copy_project(dest: Path, profile: str | None = "micro") -> Path:
    """Copy the project's files (tracked + untracked-not-ignored) into ``dest`` as a fresh git repo."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("tests/", "data/", "reports/")):
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
    env = tool_env()
    if profile:
        subprocess.run(["mcdm", "params", "apply", profile], cwd=dest, env=env, check=True, capture_output=True)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for the module (2 shared cores: more threads only stall each other),
    restored afterwards. Modules of small-model tests use it: ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def project_copy(tmp_path) -> Path:
    return copy_project(tmp_path / "proj")


MICRO_RUN = pytest.StashKey[tuple]()


def _needs_micro(item) -> bool:
    return "micro_pipeline" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """When the selection needs the micro pipeline, start its `dvc repro` now, in the background, and
    run the tests that need it last (in their own order), so that the others run meanwhile: most micro
    stages keep one of the 2 cores busy (process start-up, dlib), and the suite's wall time was the sum
    of the two (micro fixture 745 s, the rest about 820 s)."""
    if config.option.collectonly or not any(_needs_micro(item) for item in items):
        return
    items[:] = [item for item in items if not _needs_micro(item)] + [item for item in items if _needs_micro(item)]
    root = copy_project(config._tmp_path_factory.mktemp("micro") / "proj")
    log = root.parent / "repro.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=tool_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    config.stash[MICRO_RUN] = (root, proc, log)


def stop_session(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process started with ``start_new_session=True`` by its process group (the pid we
    started): SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90, status: int | None = None):
    """The first answer of ``url`` (with ``status``: the first with that status) from the server
    ``proc`` we started (its output in ``log``), polled until ``timeout`` seconds; fails with the
    log's tail when the server exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, Path(log).read_text()[-2000:]
        assert time.monotonic() < deadline, f"no answer from {url} in {timeout:g} s"
        try:
            answer = requests.get(url, timeout=2)
            if status is None or answer.status_code == status:
                return answer
        except requests.ConnectionError:
            pass
        time.sleep(0.5)


def pytest_sessionfinish(session, exitstatus):
    """A session that ends before the micro run (e.g. -x) stops it by its process group."""
    started = session.config.stash.get(MICRO_RUN, None)
    if started is not None and started[1].poll() is None:
        stop_session(started[1])


@pytest.fixture(scope="session")
def micro_pipeline(request) -> Path:
    """decisions.md #13: the micro pipeline, run ONCE per test session with `dvc repro` in a project copy
    (started at collection, see ``pytest_collection_modifyitems``; this waits for it).

    Integration tests read its outputs (data/, models/, reports/, mlflow.db, dvc.lock) instead of
    re-running stages; a test that changes the copy must work on its own copy (``copy_tree``)."""
    root, proc, log = request.config.stash[MICRO_RUN]
    code = proc.wait()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"micro `dvc repro` failed (exit {code}; log {log}):\n{tail}")
    return root


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """ONE Prefect server per test session on a free loopback port (mcdm.services, as `make prefect-up`
    starts it), its database out of the repo; the flows and work-pool tests share it. Yields
    ``(api, home, run_dir, port)``; stopped by its pid at the end."""
    from mcdm.services import start, stop

    home = tmp_path_factory.mktemp("prefect")
    run_dir = home / "run"
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))  # read by mcdm.services when it starts the server
        start("prefect-server", port, run_dir, ROOT, timeout=180)
    try:
        yield f"http://127.0.0.1:{port}/api", home, run_dir, port
    finally:
        stop("prefect-server", run_dir)


@pytest.fixture(scope="session")
def prefect_client_env(prefect_server) -> dict[str, str]:
    """The environment of a client of the session's server (URL, home, and the server's auth string)."""
    from mcdm.services import prefect_client_env as client_env

    _, home, _, port = prefect_server
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        return tool_env(**client_env(port, ROOT))


@pytest.fixture(scope="session")
def served(prefect_server, prefect_client_env, tmp_path_factory):
    """`make prefect-up`'s path: the session's server (mcdm.services) and the deployments served by a
    process started by pid from a copy of the project (a flow runs in the checkout it is served from)."""
    from mcdm.services import start, stop

    _, home, run_dir, port = prefect_server
    project = copy_project(tmp_path_factory.mktemp("served") / "proj")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))  # keep the test's server DB out of the repo
        start("prefect-serve", port, run_dir, project, timeout=180)
        try:
            yield project, prefect_client_env
        finally:
            stop("prefect-serve", run_dir)
