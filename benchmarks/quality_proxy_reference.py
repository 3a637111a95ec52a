"""Issue #20 research: does the reference frame reach the face better as INPUT CHANNELS than as tokens?

The base UNet (``base_models``) reads the reference frame only through cross-attention to its patch
tokens (``ReferenceTokens``, SD-1.5's text slot). Image-to-image diffusion models usually concatenate
the condition's latent to the noisy latent instead (``in_channels = 2 x 4``), which gives the UNet a
direct path to copy the face. This script trains the tiny base UNet both ways, for the same steps, on
the same VAE latents of a finished run (``data/split/train.parquet`` and ``models/base/vae`` of a DVC
project), samples held-out frames with 10 DDIM steps from a reference frame of the same clip, and
scores them with evaluate's measures: dlib identity distance to the reference (each frame resized to
``eval.dlib_min_side``; ground truth's own distance beside it), frames where dlib finds no face, Laplacian-variance sharpness over ground truth's, PSNR.

    python benchmarks/quality_proxy_reference.py --project PATH --steps 600 [--modes tokens,concat]
        [--profile default] [--attempts benchmarks/quality_attempts]

Modes: ``tokens`` (trained here, as base_models), ``concat`` (trained here, input channels too) and
``base`` (no training: the project's own ``models/base`` UNet and tokens, as base_models trained them
for ``base_models.unet_steps``, sampled and scored the same way). Writes one attempt file per mode
(kind ``reference_input``) for ``benchmarks/quality_attempts.py``; the tokens / base row of a latent
size is that size's baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from mcdm.train.base_models.unet import _reference_indices

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 60
SAMPLE_STEPS = 10


def _identity(dlib_face, image: np.ndarray, side: int):
    import cv2

    return dlib_face.descriptor(cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC))


def run_mode(mode: str, steps: int, fit, fit_clips, held, held_frames, pick, pick_ref, params, vae,
             project: Path) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from mcdm.eval.sharpness import laplacian_variance
    from mcdm.face.dlib import DlibFace, descriptor_distance
    from mcdm.models.diffusion_objective import denoising_mse
    from mcdm.models.reference_tokens import ReferenceTokens
    from mcdm.models.schedulers import make_scheduler
    from mcdm.models.vae import psnr, to_uint8
    from mcdm.pipelines.loading import load_ref_tokens, load_scheduler, load_unet
    from mcdm.train.builders import tiny_unet_config

    bm, model = params.base_models, params.model
    c, h, _ = fit.shape[1:]
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed + 1)
    if mode == "base":  # the project's own pretrained UNet: nothing to train
        base = project / "models/base"
        unet, tokens, scheduler = load_unet(base), load_ref_tokens(base), load_scheduler(base)
        steps = json.loads((base / "unet_metrics.json").read_text())["steps"]
    else:
        cfg = tiny_unet_config(model, h, c)
        if mode == "concat":
            cfg["in_channels"] = 2 * c  # [z_t ; z_ref]
        unet = UNet2DConditionModel(**cfg)
        tokens = ReferenceTokens(latent_channels=c, sample_size=h, patch_size=model.patch_size, dim=model.prior_dim)
        scheduler = make_scheduler(bm.prediction_type)
        weights = list(unet.parameters()) + list(tokens.parameters())
        opt = torch.optim.AdamW(weights, lr=bm.unet_lr, weight_decay=0.0)

    def predict(z_t, t, ref):
        x = torch.cat([z_t, ref], 1) if mode == "concat" else z_t
        return unet(x, t, encoder_hidden_states=tokens(ref)).sample

    cpu0, wall0 = time.process_time(), time.perf_counter()
    # base_models' loop (train/base_models/unet.py), the input being the only change
    for step in range(0 if mode == "base" else steps):
        idx = rng.integers(0, len(fit), bm.unet_batch_size)
        z0, ref = fit[idx], fit[_reference_indices(fit_clips, rng, idx)]
        if rng.random() < 0.5:
            z0, ref = z0.flip(-1), ref.flip(-1)
        eps = torch.randn_like(z0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),))
        loss = denoising_mse(scheduler, predict(scheduler.add_noise(z0, eps, t), t, ref), z0, eps, t,
                             min_snr_gamma=bm.min_snr_gamma)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"{mode} step {step}: loss {loss.item():.4f}", flush=True)
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0

    unet.eval()
    tokens.eval()
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(SAMPLE_STEPS)
    ref = held[pick_ref]
    z = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    cpu0 = time.process_time()
    with torch.no_grad():
        for t in ddim.timesteps:
            z = ddim.step(predict(z, t.repeat(len(z)), ref), t, z).prev_sample
        images = to_uint8(vae.decode(z / float(vae.config.scaling_factor)).sample)
    sample_cpu = time.process_time() - cpu0

    face, side = DlibFace(), params.eval.dlib_min_side
    gt, refs = held_frames[pick], held_frames[pick_ref]
    d_gen, d_gt, no_face = [], [], 0
    for gen, truth, reference in zip(images, gt, refs):
        e_ref, e_gt, e_gen = (_identity(face, x, side) for x in (reference, truth, gen))
        no_face += e_gen is None
        if e_ref is None:
            continue
        if e_gt is not None:
            d_gt.append(descriptor_distance(e_gt, e_ref))
        if e_gen is not None:
            d_gen.append(descriptor_distance(e_gen, e_ref))
    return {
        "mode": mode, "latent": [c, h, h], "unet_steps": steps, "unet_train_cpu_s": round(train_cpu, 1),
        "unet_train_wall_s": round(train_wall, 1),
        "unet_cpu_s_per_step": None if mode == "base" else round(train_cpu / steps, 4),
        "sample_cpu_ms_per_frame": round(1000 * sample_cpu / len(images), 1),
        "sample_identity": round(float(np.mean(d_gen)), 4), "gt_identity": round(float(np.mean(d_gt)), 4),
        "identity_note": "dlib descriptor distance to the reference frame, over frames with a face",
        "sample_no_face": int(no_face), "n": len(images),
        "sample_lapvar_ratio": round(float(laplacian_variance(images).mean() / laplacian_variance(gt).mean()), 3),
        "psnr": round(psnr(gt, images), 2), "load_before": list(os.getloadavg()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", required=True, help="a DVC project whose base_models stage has run")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--modes", default="tokens,concat")
    ap.add_argument("--attempts", default=str(ROOT / "benchmarks" / "quality_attempts"))
    ap.add_argument("--machine", default="2 cores, idle", help="the cores and what else ran on them")
    ap.add_argument("--profile", default="default", help="the profile the project was made with (for the record)")
    args = ap.parse_args(argv)

    from mcdm.config import load_params
    from mcdm.media.files import read_table
    from mcdm.models.vae import encode_latents, load_vae
    from mcdm.train.base_models.frames import load_training_frames

    project = Path(args.project).resolve()
    os.chdir(project)  # the split table's crop paths are relative to the project
    params = load_params(project / "params.yaml")
    torch.set_num_threads(params.base_models.threads)
    bm = params.base_models
    frames = load_training_frames(read_table(project / "data/split/train.parquet", "split"), params.data.fps,
                                  params.data.resolution, bm.max_frames, bm.heldout_fraction, seed=params.seed)
    vae = load_vae(project / "models/base/vae")
    fit, held = encode_latents(vae, frames.fit.frames), encode_latents(vae, frames.heldout.frames)
    pick = np.linspace(0, len(held) - 1, N_SAMPLES).astype(int)
    pick_ref = _reference_indices(frames.heldout.clip_index, np.random.default_rng(7), pick)
    out = Path(args.attempts)
    for mode in args.modes.split(","):
        m = run_mode(mode, args.steps, fit, frames.fit.clip_index, held, frames.heldout.frames, pick, pick_ref,
                     params, vae, project)
        how = {"tokens": "patch tokens (cross-attention), as base_models",
               "base": "patch tokens: the project's own base_models UNet, not retrained",
               "concat": f"latent concatenated to the noisy latent ({2 * fit.shape[1]} input channels) and its tokens"}
        steps = m["unet_steps"]
        name = f"refin_{mode}_{params.data.resolution}_{steps}"
        attempt = {"name": name, "kind": "reference_input",
                   "baseline": mode == "base" or (mode == "tokens" and steps == 600),
                   "change": f"{params.data.resolution} px base UNet, reference as {how[mode]}, {steps} steps",
                   "machine": args.machine,
                   "source": f"benchmarks/quality_proxy_reference.py --modes {mode} --steps {steps} on a "
                             f"`dvc repro evaluate` project of the {args.profile} profile",
                   "measured": m}
        (out / f"{name}.json").write_text(json.dumps(attempt, indent=1) + "\n")
        print(json.dumps(m), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
