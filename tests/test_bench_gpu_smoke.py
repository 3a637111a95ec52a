"""benchmarks/bench_gpu_smoke.py: the three stages chained through the real DeepSpeed loop on a
synthetic project, their speed and memory merged into reports/benchmarks.json. Here it runs on CPU
with a tiny model (--allow-cpu); on a GPU the same code runs the paper profile's model at 256 px."""
from __future__ import annotations

import json

import pytest
from bench_scripts import load_benchmark
from conftest import TINY_TRAINING
from test_train_engine import _restore_torch_globals  # noqa: F401 -- autouse: train_loop's global switches

# the unit tests' tiny training model, with the SD layout's block types the paper profile names
TINY = {"model": {**TINY_TRAINING["model"], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "audio_dim": 80,
                  "gradient_checkpointing": False},
        "train": {"stage3": {"batch_size": 2}}}


def _bench():
    return load_benchmark("bench_gpu_smoke")


def test_smoke_chains_the_stages_and_merges_its_section(tmp_path):
    bench = _bench()
    out = tmp_path / "benchmarks.json"
    out.write_text(json.dumps({"generation": {"kept": 1}}))
    figures_path = tmp_path / "smoke.json"
    assert bench.main(["--allow-cpu", "--resolution", "32", "--steps", "3", "--warmup", "1",
                       "--overrides", json.dumps(TINY), "--workdir", str(tmp_path / "project"),
                       "--out", str(out), "--json", str(figures_path)]) == 0
    data = json.loads(out.read_text())
    assert data["generation"] == {"kept": 1}
    figures = data["train_stages_smoke"]["cpu, 32 px, deterministic"]
    assert figures == json.loads(figures_path.read_text())
    assert figures["resolution"] == 32 and figures["latent"] == 4 and figures["synthetic_random_weights"]
    for stage in (1, 2, 3):
        f = figures[f"stage{stage}"]
        assert f["steps"] == 3 and f["samples_per_s"] > 0 and f["compute_dtype"] == "float32"
        assert 0 < f["trainable_parameters"] < f["total_parameters"]
        assert (tmp_path / "project" / "models" / f"stage{stage}" / "stage.json").is_file()
    # stage 3 trains only the present-clip reference attention and the MTA: fewer weights than stage 1's prior
    assert figures["stage3"]["trainable_parameters"] < figures["stage1"]["trainable_parameters"]
    assert figures["stage3"]["clips_per_s"] == pytest.approx(2 * figures["stage3"]["samples_per_s"])


def test_without_a_gpu_it_stops_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    with pytest.raises(SystemExit, match="no CUDA GPU here"):
        _bench().main(["--out", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()
