"""MCDM networks (each a diffusers ``ModelMixin`` + ``ConfigMixin``: ``save_pretrained`` / ``from_pretrained``).

- ``archived_prior``: archived-clip motion prior (patchify + frame-aligned attention, Eq. 1-2).
- ``temporal_attention``: FAVOR+ fast attention, the motion memory (Eq. 4-5), temporal processors (MTA / softmax).
- ``unet``: the SD-1.5-shaped four-attention denoising UNet (``MCDMUNet``, ``from_unet2d``).
- ``variants``: ``MCDMDenoiser`` (prior + UNet per ``variant``), Q-Former (b1), reference UNet (b2),
  ``build_denoiser(params)`` and the per-stage freeze API.
- ``motion_prior``: present-clip motion-prior diffusion model; ``encoders``: frozen / trained encoders.

Import from the submodules (``from mcdm.models.variants import build_denoiser``); this package file
imports nothing so that loading one network does not load the others.
"""
