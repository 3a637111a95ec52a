"""`mcdm base-models`: the base_models stage (DECISIONS #1, #2).

Thin wrapper over :func:`mcdm.train.base_models.pretrain.build_base_models`: loads SD-1.5 VAE / UNet, Wav2Vec 2.0
and CLIP vision from the local folders named under ``base_models`` in params, or pretrains the tiny
VAE (gated by held-out PSNR) and the tiny SD-shaped UNet on the training crops; writes diffusers
``save_pretrained`` folders + ``encoders.json`` under --out.
"""
from __future__ import annotations

from mcdm.config import load_params


def register(sub) -> None:
    p = sub.add_parser("base-models", help="load the paper's base weights, or pretrain the tiny VAE + UNet on the training crops")
    p.add_argument("--train", required=True, help="the training split table (e.g. data/split/train.parquet)")
    p.add_argument("--out", required=True, help="output folder (e.g. models/base)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    params = load_params(args.params)
    from mcdm.train.base_models.pretrain import build_base_models

    m = build_base_models(args.train, args.out, params, progress=not args.quiet)
    vae, unet = m["vae"], m["unet"]
    print(
        f"wrote {args.out} in {m['seconds']:.0f} s: VAE {vae['source']} (held-out PSNR {vae['psnr_heldout']:.2f} dB, "
        f"latent {vae['latent_channels']}x{vae['latent_size']}x{vae['latent_size']}, scaling {vae['scaling_factor']:.4f}); "
        f"UNet {unet['source']}; audio {m['audio']['backend']} ({m['audio']['dim']}-d); "
        f"identity {m['image']['backend']} ({m['image']['dim']}-d)"
    )
    return 0
