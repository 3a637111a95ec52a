"""The DeepSpeed training engine on CPU with a tiny diffusers model: resume after SIGKILL is bitwise
equal to an uninterrupted run, a NaN loss stops the stage keeping the last good checkpoint, and a
checkpoint of another variant / shape is refused naming both shapes.

Run as a script (``python tests/test_train_engine.py CKPT OUT [--step-delay S] [--progress FILE]``)
it is one training stage; the SIGKILL test starts it in subprocesses.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from mcdm.config import Params
from mcdm.errors import McdmError
from mcdm.train.checkpoints import CheckpointMismatch, complete_checkpoints, tag_for
from mcdm.train.data import StepBatchSampler
from mcdm.train.engine import NonFiniteLoss, resolve_deepspeed_config, train_loop
from mcdm.train.export import export_pretrained
from mcdm.train.spec import TrainSpec

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
DS_CONFIG = ROOT / "configs" / "deepspeed" / "zero2.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


class ToyDenoiser(ModelMixin, ConfigMixin):
    """A two-layer noise predictor behind a frozen 'encoder' (the shape of a stage: frozen + trained)."""

    @register_to_config
    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__()
        self.encoder = nn.Linear(dim, dim)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.encoder(x))


class CheckpointedToy(ToyDenoiser):
    """The diffusers pattern for gradient checkpointing (what the 512 px switch turns on)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__(dim, hidden)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(self.net, h)
        return self.net(h)


class ToyData(Dataset):
    def __init__(self, n: int = 24, dim: int = 8):
        self.x = torch.randn(n, dim, generator=torch.Generator().manual_seed(123))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "index": i}


def denoise_loss(engine, batch) -> torch.Tensor:
    noise = torch.randn_like(batch["x"])  # the global RNG: a resumed run must restore its state
    return F.mse_loss(engine(batch["x"] + noise), noise)


def make_model(hidden: int = 16) -> ToyDenoiser:
    torch.manual_seed(0)
    model = ToyDenoiser(hidden=hidden)
    model.encoder.requires_grad_(False)
    return model


def make_spec(ckpt: Path, steps: int = 12, every: int = 4, variant: str = "full", fingerprint=None,
              **more) -> TrainSpec:
    return TrainSpec(name="toy", steps=steps, batch_size=4, lr=1e-2, checkpoint_dir=ckpt, checkpoint_every=every,
                     warmup_steps=3, seed=0, deepspeed_config=DS_CONFIG, variant=variant,
                     fingerprint=fingerprint or {"toy": 1}, **more)


class ProgressFile:
    """A tracker stand-in that writes the last finished step to a file (the test watches it)."""

    run_id = None

    def __init__(self, path: Path | None):
        self.path = path

    def log_metrics(self, metrics, step):
        if self.path:
            self.path.write_text(str(step))

    def resumed(self, step, previous_run):
        pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--step-delay", type=float, default=0.0)
    ap.add_argument("--progress", type=Path)
    args = ap.parse_args(argv)

    def loss_fn(engine, batch):
        time.sleep(args.step_delay)
        return denoise_loss(engine, batch)

    result = train_loop(make_model(), loss_fn, ToyData(), make_spec(args.ckpt), tracker=ProgressFile(args.progress))
    export_pretrained(result.engine.module, args.out, rank=result.rank)


# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """train_loop switches on deterministic algorithms and reseeds: leave the session as we found it."""
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn)
    torch.set_rng_state(rng)


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"), PYTHONUNBUFFERED="1")
    return env


def _wait_for_step(progress: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = progress.read_text().strip() if progress.exists() else ""
        if text.isdigit() and int(text) >= step:  # (the writer may have just truncated it)
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_sigkill_mid_run_then_resume_ends_bitwise_equal(tmp_path):
    env = _clean_env(tmp_path)
    script = [sys.executable, str(HERE)]
    progress = tmp_path / "progress"
    victim = subprocess.Popen(script + [str(tmp_path / "ck"), str(tmp_path / "out"), "--step-delay", "0.25",
                                        "--progress", str(progress)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # meanwhile the uninterrupted reference, in this process, on one thread like the subprocesses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([str(tmp_path / "ck_ref"), str(tmp_path / "out_ref")])
    finally:
        torch.set_num_threads(threads)

    _wait_for_step(progress, 6, victim)  # checkpoint 4 is on disk, checkpoint 8 (most likely) not yet
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    saved = [s for s, _, _ in complete_checkpoints(tmp_path / "ck")]
    assert saved and saved[-1] in (4, 8)  # a slow poll on a busy machine may let step 8 through
    last = saved[-1]
    assert not (tmp_path / "out").exists()
    # a kill in the middle of writing the next checkpoint leaves a folder without its meta file: ignored
    torn = tmp_path / "ck" / tag_for(last + 4)
    torn.mkdir(exist_ok=True)
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"torn")

    resumed = subprocess.run(script + [str(tmp_path / "ck"), str(tmp_path / "out")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"toy: resumed from step {last}" in resumed.stderr
    assert f"toy: 12 steps ({12 - last} this run" in resumed.stderr  # the one-line summary

    ref, got = load_file(tmp_path / "out_ref" / WEIGHTS), load_file(tmp_path / "out" / WEIGHTS)
    assert ref.keys() == got.keys() == make_model().state_dict().keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    init = make_model().state_dict()
    assert not torch.equal(ref["net.0.weight"], init["net.0.weight"])  # it did train
    assert torch.equal(ref["encoder.weight"], init["encoder.weight"])  # the frozen part did not
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden"] == 16
    # checkpoints: the newest two, each without the frozen encoder; nothing compiled on CPU
    assert [s for s, _, _ in complete_checkpoints(tmp_path / "ck")] == [8, 12]
    assert (tmp_path / "ck" / "latest").read_text() == "step_00000012"
    assert not list((tmp_path / "torch_extensions").rglob("*.so"))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    calls = {"n": 0}

    def poisoned(engine, batch):
        calls["n"] += 1
        loss = denoise_loss(engine, batch)
        return loss * float("nan") if calls["n"] == 6 else loss

    with pytest.raises(NonFiniteLoss, match=r"toy: loss is nan at step 6; stopped \(the last good checkpoint is step 4"):
        train_loop(make_model(), poisoned, ToyData(), make_spec(ck))
    assert [s for s, _, _ in complete_checkpoints(ck)] == [4]
    assert (ck / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000004"]

    result = train_loop(make_model(), denoise_loss, ToyData(), make_spec(ck))
    assert result.resumed_from == 4 and result.steps == 12 and result.steps_run == 8
    assert all(torch.isfinite(p).all() for p in result.engine.module.parameters())
    # the step count lowered below the newest checkpoint (12; 8 is kept too): resume inside it
    shorter = train_loop(make_model(), denoise_loss, ToyData(), make_spec(ck, steps=10))
    assert shorter.resumed_from == 8 and shorter.steps == 10
    assert [s for s, _, _ in complete_checkpoints(ck)] == [8, 10]


def test_checkpoint_of_other_variant_or_shape_is_refused(tmp_path):
    ck = tmp_path / "ck"
    first = train_loop(make_model(), denoise_loss, ToyData(), make_spec(ck, steps=2, every=2))
    assert first.resumed_from is None and first.steps_run == 2

    with pytest.raises(CheckpointMismatch) as err:
        train_loop(make_model(hidden=12), denoise_loss, ToyData(), make_spec(ck, steps=4, every=2, variant="wo_fa"))
    msg = str(err.value)
    assert "net.0.weight: (16, 8) in the checkpoint vs (12, 8) in this model" in msg
    assert "variant 'full'" in msg and "variant 'wo_fa'" in msg and "\n" not in msg
    with pytest.raises(CheckpointMismatch, match=r"variant 'full', this run is variant 'wo_mta'; same shapes"):
        train_loop(make_model(), denoise_loss, ToyData(), make_spec(ck, steps=4, every=2, variant="wo_mta"))
    with pytest.raises(CheckpointMismatch, match=r"net.2.weight: \(8, 16\) in the checkpoint vs \(8, 12\)"):
        train_loop(make_model(hidden=12), denoise_loss, ToyData(), make_spec(ck, steps=4, every=2))  # same run?!
    assert [s for s, _, _ in complete_checkpoints(ck)] == [2]  # refusing deletes nothing

    # same variant, other params (the fingerprint; here also other shapes): the old run cannot
    # continue this one, so its checkpoints are dropped and training starts over
    again = train_loop(make_model(hidden=12), denoise_loss, ToyData(),
                       make_spec(ck, steps=2, every=2, fingerprint={"toy": 2}))
    assert again.resumed_from is None and again.steps_run == 2
    assert complete_checkpoints(ck)[-1][2]["trainable"]["net.0.weight"] == [12, 8]


def test_bf16_trains_in_bf16_and_exports_the_fp32_master_weights(tmp_path):
    """The GPU precision path, run on CPU: the model computes in bf16, the export is fp32."""
    result = train_loop(make_model(), denoise_loss, ToyData(), make_spec(tmp_path / "ck", steps=3, every=3,
                                                                         precision="bf16"))
    module = result.engine.module
    assert module.net[0].weight.dtype == torch.bfloat16
    export_pretrained(module, tmp_path / "out", rank=result.rank)
    exported = load_file(tmp_path / "out" / WEIGHTS)
    master = exported["net.0.weight"]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master.bfloat16(), module.net[0].weight.detach(), rtol=0, atol=0)  # same weights...
    assert not torch.equal(master, master.bfloat16().float())  # ...kept at full precision
    assert not (tmp_path / "out.tmp").exists()


def test_gradient_checkpointing_switch_gives_the_same_training(tmp_path):
    def model():
        torch.manual_seed(0)
        m = CheckpointedToy()
        m.encoder.requires_grad_(False)
        return m

    plain = train_loop(model(), denoise_loss, ToyData(), make_spec(tmp_path / "a", steps=3, every=3))
    recomputed = train_loop(model(), denoise_loss, ToyData(),
                            make_spec(tmp_path / "b", steps=3, every=3, gradient_checkpointing=True))
    assert not plain.engine.module.gradient_checkpointing and recomputed.engine.module.gradient_checkpointing
    for (key, a), b in zip(plain.engine.module.state_dict().items(), recomputed.engine.module.state_dict().values()):
        assert torch.equal(a, b), key


def test_on_checkpoint_files_join_the_checkpoint_and_its_sampling_leaves_training_alone(tmp_path):
    def preview(engine, step):
        torch.randn(100), np.random.rand(10), random.random()  # a preview that samples
        (tmp_path / "ck" / tag_for(step) / "preview.txt").write_text(str(step))

    plain = train_loop(make_model(), denoise_loss, ToyData(), make_spec(tmp_path / "plain", steps=4, every=2))
    hooked = train_loop(make_model(), denoise_loss, ToyData(), make_spec(tmp_path / "ck", steps=4, every=2),
                        on_checkpoint=preview)
    assert [(p / "preview.txt").read_text() for _, p, _ in complete_checkpoints(tmp_path / "ck")] == ["2", "4"]
    for a, b in zip(plain.engine.module.parameters(), hooked.engine.module.parameters()):
        assert torch.equal(a, b)


def test_sampler_splits_each_global_batch_without_overlap_and_resumes():
    one = StepBatchSampler(10, 4, steps=7, seed=3)
    ranks = [StepBatchSampler(10, 4, steps=7, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for step, (a, b) in enumerate(zip(*ranks)):
        assert not set(a) & set(b) and len(a) == len(b) == 2
        assert a + b == one.global_batch_indices(step)  # the global batch does not depend on the ranks
    # 10 samples, batch 4: 2 steps per epoch, each epoch a fresh permutation without repeats
    epoch0 = one.global_batch_indices(0) + one.global_batch_indices(1)
    assert len(set(epoch0)) == 8 and one.global_batch_indices(2) != one.global_batch_indices(0)
    assert list(StepBatchSampler(10, 4, steps=7, seed=3, start_step=4)) == list(one)[4:]
    with pytest.raises(McdmError, match="fewer than one batch"):
        StepBatchSampler(3, 4, steps=1)


def test_deepspeed_config_is_filled_for_cpu_from_params():
    spec = TrainSpec.from_params(Params(), 1, "unused")
    assert spec.deepspeed_config == Path("configs/deepspeed/zero2.json")
    assert (ROOT / spec.deepspeed_config).is_file()
    cfg = resolve_deepspeed_config(ROOT / spec.deepspeed_config, spec, world_size=2)
    assert cfg["train_batch_size"] == spec.batch_size and cfg["train_micro_batch_size_per_gpu"] == spec.batch_size // 2
    assert cfg["bf16"]["enabled"] is False and cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["optimizer"]["params"]["lr"] == spec.lr and cfg["zero_optimization"]["stage"] == 2
    assert "auto" not in json.dumps(cfg)
    # the stage's params are in the fingerprint, its step count is not (more steps continue a run)
    # overlays are merged into the full defaults, as `mcdm params apply` and `dvc exp run -S` do
    from mcdm.config import deep_merge

    longer = Params.model_validate(deep_merge(Params().model_dump(mode="json"), {"train": {"stage1": {"steps": 999}}}))
    other_lr = Params.model_validate(deep_merge(Params().model_dump(mode="json"), {"train": {"stage1": {"lr": 0.5}}}))
    assert TrainSpec.from_params(longer, 1, "x").fingerprint == spec.fingerprint
    assert TrainSpec.from_params(other_lr, 1, "x").fingerprint != spec.fingerprint


if __name__ == "__main__":
    main()
