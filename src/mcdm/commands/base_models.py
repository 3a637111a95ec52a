"""`mcdm base-models`: load the paper's base weights from local folders, or pretrain the tiny VAE
and the tiny SD-shaped UNet on the training crops (decisions.md #1)."""
from __future__ import annotations

from mcdm.commands.args import QUIET, Command, out, required
from mcdm.train.base_models.pretrain import build_base_models


def run(params, args) -> None:
    m = build_base_models(args.train, args.out, params, progress=not args.quiet)
    vae, unet = m["vae"], m["unet"]
    print(f"wrote {args.out} in {m['seconds']:.0f} s: VAE {vae['source']} (held-out PSNR {vae['psnr_heldout']:.2f} dB, "
          f"latent {vae['latent_channels']}x{vae['latent_size']}x{vae['latent_size']}, scaling {vae['scaling_factor']:.4f}); "
          f"UNet {unet['source']}; audio {m['audio']['backend']} ({m['audio']['dim']}-d); "
          f"identity {m['image']['backend']} ({m['image']['dim']}-d)")


COMMAND = Command(run, (required("--train", "the training split table (e.g. data/split/train.parquet)"),
                        out("output folder (e.g. models/base)"), QUIET))
