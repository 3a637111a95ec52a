"""Data parallel on CPU: two gloo ranks started by DeepSpeed's own launcher
(``deepspeed --num_accelerators 2``) end with identical weights, split every global batch without
overlap, and match a one-process run on the same global batches.

Run by the launcher, this file is the training script of each rank (``--out DIR``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import free_port, tool_env
from safetensors.torch import load_file, save_file
from test_train_engine import (
    DS_CONFIG,
    WEIGHTS,
    ToyData,
    _restore_torch_globals,  # noqa: F401 -- autouse: train_loop's global switches
    make_model,
)

from mcdm.train.data import StepBatchSampler
from mcdm.train.engine import train_loop
from mcdm.train.export import export_pretrained
from mcdm.train.spec import TrainSpec

HERE = Path(__file__).resolve()
STEPS, BATCH = 5, 4


def target_loss(engine, batch, seen: list | None = None) -> torch.Tensor:
    """A loss without randomness (so one process and two ranks follow the same maths)."""
    if seen is not None:
        seen.append(batch["index"].tolist())
    x = batch["x"]
    return F.mse_loss(engine(x), torch.sin(3 * x))


def spec(ckpt: Path) -> TrainSpec:
    return TrainSpec(name="ddp", steps=STEPS, batch_size=BATCH, lr=1e-2, checkpoint_dir=ckpt, checkpoint_every=STEPS,
                     seed=0, deepspeed_config=DS_CONFIG, fingerprint={"toy": "ddp"})


def worker(out: Path) -> None:
    seen: list[list[int]] = []
    result = train_loop(make_model(), lambda engine, batch: target_loss(engine, batch, seen), ToyData(),
                        spec(out / "ckpt"))
    rank = result.rank
    (out / f"indices_rank{rank}.json").write_text(json.dumps({"world_size": result.world_size, "steps": seen}))
    save_file({k: v.contiguous() for k, v in result.engine.module.state_dict().items()},
              out / f"weights_rank{rank}.safetensors")
    export_pretrained(result.engine.module, out / "model", rank=rank)


def test_two_cpu_ranks_through_the_deepspeed_launcher(tmp_path):
    env = tool_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), "--no_local_rank",
           str(HERE), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    w0, w1 = (load_file(tmp_path / f"weights_rank{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key

    seen = [json.loads((tmp_path / f"indices_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in seen] == [2, 2]
    order = StepBatchSampler(len(ToyData()), BATCH, STEPS, seed=0)
    assert len(seen[0]["steps"]) == len(seen[1]["steps"]) == STEPS
    for step, (a, b) in enumerate(zip(seen[0]["steps"], seen[1]["steps"])):
        assert len(a) == len(b) == BATCH // 2 and not set(a) & set(b)
        assert a + b == order.global_batch_indices(step)

    exported = load_file(tmp_path / "model" / WEIGHTS)
    assert all(torch.equal(exported[k], w0[k]) for k in exported)

    # one process on the same global batches: the same weights up to fp32 summation order
    single = train_loop(make_model(), target_loss, ToyData(), spec(tmp_path / "single"))
    assert single.world_size == 1
    ref = single.engine.module.state_dict()
    init = make_model().state_dict()
    for key in w0:
        torch.testing.assert_close(w0[key], ref[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w0["net.2.weight"], init["net.2.weight"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    worker(ap.parse_args().out)
