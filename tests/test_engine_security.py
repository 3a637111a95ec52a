"""The training engine's two holes of the security review (issue #18): resuming must not unpickle
code (#18.2: DeepSpeed loads its checkpoint files with ``weights_only=False``), and a single-process
stage must not listen on every interface (#18.6: the ``env://`` TCP store listened on ``*:PORT``)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import ROOT, TINY_TRAINING, tiny
from test_train_engine import HERE as TOY_SCRIPT
from test_train_engine import (
    _clean_env,
    _restore_torch_globals,  # noqa: F401 -- autouse: train_loop's global switches
    _wait_for_step,
)

from mcdm.cli import main
from mcdm.config import deep_merge
from mcdm.train.checkpoints import complete_checkpoints
from mcdm.train.safe_checkpoint import allowed_names
from mcdm.train.synthetic import write_project

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = deep_merge(TINY_TRAINING, {"train": {"checkpoint_every": 2, "stage1": {"steps": 2}}})


class Payload:
    """What an attacker plants: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _train_stage1(root: Path, checkpoints: Path) -> int:
    return main(["--params", str(root / "params.yaml"), "train", "--stage", "1",
                 "--features", str(root / "data" / "features"), "--base", str(root / "models" / "base"),
                 "--out", str(root / "out" / checkpoints.name), "--checkpoints", str(checkpoints)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny stage 1 trained by `mcdm train` in this process: its checkpoint folder at step 2."""
    root = tmp_path_factory.mktemp("engine_security")
    write_project(root, tiny(TINY_TRAINING), res=32, latent=4, audio_dim=80, ref_dim=144)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MCDM_PARENT_RUN_ID", "DVC_STAGE", "DVC_EXP_NAME", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("DVC_ROOT", str(root))
        mp.chdir(ROOT)  # train.deepspeed_config is relative to the project root
        assert _train_stage1(root, root / "checkpoints") == 0
        yield root


def test_a_fresh_checkpoint_pickles_only_allowed_classes(trained):
    root = trained
    (_, folder, _), = complete_checkpoints(root / "checkpoints")
    files = sorted(folder.glob("*.pt"))
    assert [f.name for f in files] == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    found = set()
    for f in files:
        found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    # a DeepSpeed upgrade that pickles a new class fails here first: allow it in safe_checkpoint.py
    assert found <= allowed_names(), sorted(found - allowed_names())
    assert found, "no DeepSpeed class at all: the allow-list may have become unnecessary"


def test_resuming_a_planted_checkpoint_refuses_it_without_running_it(trained, tmp_path, capsys):
    root = trained
    attacked = tmp_path / "attacked"
    shutil.copytree(root / "checkpoints", attacked)
    (_, folder, _), = complete_checkpoints(attacked)
    target = folder / "mp_rank_00_model_states.pt"
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, target)  # mcdm_checkpoint.json still marks it complete

    capsys.readouterr()
    assert _train_stage1(root, attacked) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mcdm train: error: {target}: refusing to load it"), err
    assert "posix.system" in err, err
    assert not marker.exists()
    assert not (root / "out" / attacked.name).exists()

    # the payload is real: DeepSpeed's own loader (weights_only=False) runs it
    torch.load(target, weights_only=False)
    assert marker.exists()


def test_a_single_process_stage_listens_on_no_outside_address(tmp_path):
    env = _clean_env(tmp_path)
    progress = tmp_path / "progress"
    proc = subprocess.Popen([sys.executable, str(TOY_SCRIPT), str(tmp_path / "ck"), str(tmp_path / "out"),
                             "--step-delay", "0.2", "--progress", str(progress)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(progress, 2, proc)  # the process group is up and training
        listening = []
        for _ in range(5):
            listening += [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="tcp")
                          if c.status == psutil.CONN_LISTEN]
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    outside = [addr for addr in listening if addr.ip not in ("127.0.0.1", "::1")]
    assert not outside, f"listening beyond loopback: {outside}"
