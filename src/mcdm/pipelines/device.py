"""Where generation runs: ``--device auto|cpu|cuda[:N]`` and ``--dtype auto|float32|float16|bfloat16``.

``auto`` picks the first CUDA device when torch sees one, else the CPU; on CUDA ``auto`` precision is
bfloat16 where the card supports it, else float16, and float32 on the CPU (as SadTalker and Hallo run
half precision on GPUs). A device or precision that cannot work here is refused with one line before
anything loads: CUDA when torch has none, a GPU index past the last one, float16 on the CPU (its
convolutions are not implemented there for every op).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mcdm.errors import McdmError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return f"{self.device} ({name}), {str(self.dtype).removeprefix('torch.')}"


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device that exists here, or a one-line error."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise McdmError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise McdmError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}, {build}); "
                        "use --device cpu or auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise McdmError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA device(s) (cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The precision for ``device``: ``auto`` as the module docstring says; float16 on the CPU is refused."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec not in DTYPES:
        raise McdmError(f"--dtype {spec}: expected auto, {', '.join(DTYPES)}")
    if spec == "float16" and device.type == "cpu":
        raise McdmError("--dtype float16: not on the CPU (use float32 or bfloat16 there, float16 on CUDA)")
    return DTYPES[spec]


def placement(device: str = "auto", dtype: str = "auto") -> Placement:
    dev = resolve_device(device)
    return Placement(dev, resolve_dtype(dtype, dev))


# the networks that run in reduced precision: the denoiser (the UNet, nearly all of the work) and the VAE,
# and the landmark guider that feeds the UNet; the motion prior (a small transformer sampled with its own
# scheduler) and the frozen encoders stay in float32, as diffusers keeps a model's fp32 modules.
REDUCED = ("denoiser", "vae", "landmark_guider")


def place(pipe, where: Placement):
    """Move ``pipe`` to ``where.device``; cast the heavy networks to ``where.dtype``. Returns ``pipe``."""
    pipe.to(where.device)
    if where.dtype != torch.float32:
        for name in REDUCED:
            module = getattr(pipe, name, None)
            if module is not None:
                torch.nn.Module.to(module, dtype=where.dtype)  # diffusers' .to() logs a line per module
    return pipe
