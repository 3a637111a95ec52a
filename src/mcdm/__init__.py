"""MCDM: Motion-priors Conditional Diffusion Model for long-term talking-face video."""
import os

# OpenMP threads that spin while they wait make torch 15-30x slower whenever the cores are shared
# (measured here: a small conv training step with 2 threads at load 5 took 12-25 s spinning vs 0.7-0.9 s
# passive). Set before torch is first imported; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
