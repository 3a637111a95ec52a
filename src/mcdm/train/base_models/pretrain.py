"""The ``base_models`` stage: load paper-scale weights from local folders, or pretrain tiny ones.

In order (decisions.md #1, #2), on the TRAINING split only:

1. VAE: ``base_models.vae_path`` (SD-1.5's, diffusers format), else the tiny AutoencoderKL trained
   until its held-out PSNR passes ``vae_psnr_threshold`` (:mod:`mcdm.train.base_models.vae`);
2. UNet: ``base_models.unet_path``, else the tiny SD-shaped UNet pretrained as a reference-conditioned
   denoiser on the VAE's latents (:mod:`mcdm.train.base_models.unet`), with its reference tokenizer;
3. scheduler: SD-1.5's DDPM training schedule (or the ``scheduler/`` folder beside ``unet_path``);
4. encoders: Wav2Vec 2.0 / CLIP vision from local folders when given, else the labelled fallbacks
   ``logmel`` / ``dlib+vae`` (no weights of their own); written to ``encoders.json``.

Everything is written with ``save_pretrained`` into a temporary folder renamed to ``out_dir`` at the
end (a killed run leaves no half-written output); the layout is described in :mod:`mcdm.media.layout`.
A VAE below its PSNR threshold stops the stage with one line; its metrics and reconstruction grid are
kept in ``<out_dir>.failed/`` to look at.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from mcdm.config import Params
from mcdm.errors import McdmError
from mcdm.media import layout
from mcdm.media.files import read_table
from mcdm.models.audio_features import LogMelAudio, Wav2Vec2Audio
from mcdm.models.identity import ClipIdentity
from mcdm.models.loading import load_strict
from mcdm.models.schedulers import make_scheduler
from mcdm.models.vae import encode_latents, psnr, reconstruct, vae_downsample
from mcdm.train.base_models.frames import load_training_frames
from mcdm.train.base_models.unet import train_unet
from mcdm.train.base_models.vae import save_recon_grid, train_vae

PREPROCESSOR = "preprocessor_config.json"


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def _save_transformers(model, src: str | Path, dest: Path) -> None:
    """save_pretrained (safetensors) plus the source's preprocessor config, which the encoders read."""
    model.save_pretrained(dest, safe_serialization=True)
    pre = Path(src) / PREPROCESSOR
    if pre.exists():
        shutil.copy2(pre, dest / PREPROCESSOR)


def _load_given(cls, path: str, key: str):
    if not Path(path).is_dir():
        raise McdmError(f"base_models.{key}: {path} is not a folder")
    return load_strict(cls, path)


def _vae_step(params: Params, frames, tmp: Path, device, progress: bool):
    """``(vae, metrics, report)``; ``report`` (the PSNR gate) is None for given weights."""
    bm, res = params.base_models, params.data.resolution
    report = None
    if bm.vae_path:
        from diffusers import AutoencoderKL

        vae = _load_given(AutoencoderKL, bm.vae_path, "vae_path").to(device)
        held = frames.heldout.frames[:32]
        metrics = {"source": bm.vae_path, "psnr_heldout": psnr(held, reconstruct(vae, held, batch=8)),
                   "psnr_threshold": None, "note": "given weights: PSNR reported, not gated"}
    else:
        vae, report = train_vae(frames.fit.frames, frames.heldout.frames, bm, res, seed=params.seed,
                                device=device, progress=progress)
        metrics = {"source": "trained", **report.to_dict()}
    if res % vae_downsample(vae):
        raise McdmError(f"data.resolution={res} is not a multiple of the VAE's downsampling {vae_downsample(vae)}")
    metrics.update(scaling_factor=float(vae.config.scaling_factor), latent_channels=int(vae.config.latent_channels),
                   latent_size=res // vae_downsample(vae), heldout_clips=frames.heldout.clip_ids,
                   fit_frames=len(frames.fit), heldout_frames=len(frames.heldout))
    vae.save_pretrained(tmp / layout.VAE)
    _write_json(metrics, tmp / "vae_metrics.json")
    save_recon_grid(vae, frames.heldout.frames, tmp / "vae_recon.png", scale=max(1, 192 // res))
    return vae, metrics, report


def check_unet_fits(unet, vae, params: Params) -> None:
    """The UNet must take the VAE's latents, and its cross-attention (attn2, which initialises the
    archived-clip reference attention, decisions.md #5) must take motion-prior tokens of width prior_dim."""
    if int(unet.config.in_channels) != int(vae.config.latent_channels):
        raise McdmError(f"base_models.unet_path: the UNet takes {unet.config.in_channels} channels but the VAE "
                        f"makes {vae.config.latent_channels}-channel latents")
    if int(unet.config.cross_attention_dim) != params.model.prior_dim:
        raise McdmError(f"base_models.unet_path: the UNet's cross_attention_dim is {unet.config.cross_attention_dim} "
                        f"but model.prior_dim is {params.model.prior_dim}; set model.prior_dim: {unet.config.cross_attention_dim}")


def _unet_step(params: Params, vae, frames, tmp: Path, device, progress: bool) -> dict:
    bm = params.base_models
    if bm.unet_path:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        unet = _load_given(UNet2DConditionModel, bm.unet_path, "unet_path")
        check_unet_fits(unet, vae, params)
        sched_dir = Path(bm.unet_path).parent / "scheduler"
        scheduler = DDPMScheduler.from_pretrained(sched_dir) if (sched_dir / "scheduler_config.json").exists() else make_scheduler()
        unet.save_pretrained(tmp / layout.UNET)
        scheduler.save_pretrained(tmp / layout.SCHEDULER)
        return {"source": bm.unet_path}
    fit = encode_latents(vae, frames.fit.frames)
    held = encode_latents(vae, frames.heldout.frames)
    unet, ref_tokens, scheduler, report = train_unet(
        fit, frames.fit.clip_index, held, frames.heldout.clip_index, bm, params.model,
        seed=params.seed, device=device, progress=progress,
    )
    unet.save_pretrained(tmp / layout.UNET)
    ref_tokens.save_pretrained(tmp / layout.REF_TOKENS)
    scheduler.save_pretrained(tmp / layout.SCHEDULER)
    metrics = {"source": "trained", **report.to_dict()}
    _write_json(metrics, tmp / "unet_metrics.json")
    return metrics


def _encoders_step(params: Params, vae, tmp: Path) -> dict:
    bm = params.base_models
    if bm.wav2vec2_path:
        audio = Wav2Vec2Audio.from_folder(bm.wav2vec2_path)
        _save_transformers(audio.model, bm.wav2vec2_path, tmp / layout.AUDIO_ENCODER)
        audio_entry = {"backend": audio.name, "dim": audio.dim, "source": bm.wav2vec2_path}
    else:
        audio = LogMelAudio()
        audio_entry = {"backend": audio.name, "dim": audio.dim, "source": None,
                       "note": "fallback (no base_models.wav2vec2_path): 80-bin log-mel averaged per video frame"}
    if bm.clip_path:
        image = ClipIdentity.from_folder(bm.clip_path)
        _save_transformers(image.model, bm.clip_path, tmp / layout.IMAGE_ENCODER)
        image_entry = {"backend": image.name, "dim": image.dim, "source": bm.clip_path}
    else:
        image_entry = {"backend": "dlib+vae", "dim": 128 + 4 * int(vae.config.latent_channels), "source": None,
                       "note": "fallback (no base_models.clip_path): dlib 128-d face descriptor + the VAE latent pooled to 2x2"}
    return {"audio": audio_entry, "image": image_entry}


def _replace_dir(src: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(src, dest)


def build_base_models(train_path: str | os.PathLike, out_dir: str | os.PathLike, params: Params,
                      progress: bool = True) -> dict:
    """Run the stage; returns the content of ``encoders.json`` (with the VAE / UNet entries)."""
    started = time.perf_counter()
    torch.set_num_threads(params.base_models.threads)
    device = pick_device()
    bm = params.base_models
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    train = read_table(train_path, "split")
    needs_frames = not (bm.vae_path and bm.unet_path)
    frames = load_training_frames(train, params.data.fps, params.data.resolution,
                                  bm.max_frames if needs_frames else 64, bm.heldout_fraction, seed=params.seed)
    vae, vae_metrics, vae_report = _vae_step(params, frames, tmp, device, progress)
    if vae_report is not None and not vae_report.passed:  # keep the evidence, then stop in one line
        failed = out_dir.with_name(out_dir.name + ".failed")
        _replace_dir(tmp, failed)
        vae_report.require_threshold(f" (see {failed / 'vae_recon.png'})")
    unet_metrics = _unet_step(params, vae, frames, tmp, device, progress)
    manifest = _encoders_step(params, vae, tmp)
    manifest["vae"] = {"source": vae_metrics["source"], "scaling_factor": vae_metrics["scaling_factor"],
                       "latent_channels": vae_metrics["latent_channels"], "latent_size": vae_metrics["latent_size"],
                       "psnr_heldout": vae_metrics["psnr_heldout"]}
    manifest["unet"] = {"source": unet_metrics["source"], "ref_tokens": (tmp / layout.REF_TOKENS).is_dir()}
    manifest["resolution"] = params.data.resolution
    manifest["rejects"] = frames.rejects
    manifest["seconds"] = round(time.perf_counter() - started, 1)
    _write_json(manifest, tmp / layout.ENCODERS_JSON)
    _replace_dir(tmp, out_dir)
    return manifest
