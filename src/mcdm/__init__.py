"""MCDM: Motion-priors Conditional Diffusion Model for long-term talking-face video."""

__version__ = "0.1.0"
