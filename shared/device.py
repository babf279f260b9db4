"""Where tensors live and in what precision they compute.

- `get_device()`: CUDA if present; Apple's MPS only on torch >= 2.9 (older MPS builds train to
  wrong losses); otherwise the CPU.
- `seed_everything(seed)`: the same random numbers from Python, NumPy and torch on every run.
- `choose_precision(device)`: the autocast dtype and whether a GradScaler is needed: bf16 where the
  GPU's tensor cores compute it (compute capability 8.0 and newer), fp16 with a scaler on older GPUs (T4,
  V100), fp32 on CPU and MPS.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

MIN_MPS_TORCH = (2, 9)


def torch_version_tuple(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``"2.13.0+cpu"``."""
    version = torch.__version__ if version is None else version
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def mps_is_usable(version: str | None = None) -> bool:
    """True when Apple's MPS backend is present and recent enough to train correctly."""
    backend = getattr(torch.backends, "mps", None)
    available = backend is not None and backend.is_available()
    return available and torch_version_tuple(version) >= MIN_MPS_TORCH


def get_device(preference: str = "auto") -> torch.device:
    """The device to compute on.

    `preference` is ``"auto"`` (CUDA, then usable MPS, then CPU) or a device name that must exist.
    """
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_is_usable():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if preference == "mps" and not mps_is_usable():
        raise ValueError(
            f"device 'mps' was asked for but MPS is unavailable or torch {torch.__version__} is older "
            f"than {'.'.join(map(str, MIN_MPS_TORCH))}; use 'auto' or 'cpu'"
        )
    if preference not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {preference!r}; use auto, cpu, cuda or mps")
    return torch.device(preference)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


@dataclass(frozen=True)
class Precision:
    """How a training step computes: autocast to `dtype` (None: plain fp32), and whether fp16
    gradients need a GradScaler to keep small values from flushing to zero."""

    dtype: torch.dtype | None
    use_grad_scaler: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def bf16_in_hardware(device: torch.device | str) -> bool:
    """Whether the CUDA GPU `device` computes bf16 on its tensor cores: compute capability 8.0 and newer
    (Ampere, Ada, Hopper, Blackwell). `torch.cuda.is_bf16_supported()` answers True on older GPUs too (a T4
    is 7.5), because bf16 runs there by emulation: without tensor cores, and without the fused attention
    kernels, so a run sized for fp16 would be slow and could run out of memory."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def choose_precision(device: torch.device | str, bf16_supported: bool | None = None) -> Precision:
    """The mixed-precision recipe for `device`.

    CUDA with bf16 in hardware (Ampere and newer, `bf16_in_hardware`): bf16, no scaler. Older CUDA GPUs
    (T4, V100): fp16 with a GradScaler. CPU and MPS: fp32. `bf16_supported` overrides the query.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return Precision(dtype=None, use_grad_scaler=False)
    if bf16_supported is None:
        bf16_supported = bf16_in_hardware(device)
    if bf16_supported:
        return Precision(dtype=torch.bfloat16, use_grad_scaler=False)
    return Precision(dtype=torch.float16, use_grad_scaler=True)


def autocast(device: torch.device | str, precision: Precision):
    """A context manager that runs the forward pass in `precision` (a no-op for fp32)."""
    device = torch.device(device)
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def enable_tf32() -> None:
    """Let CUDA matmuls use TF32 tensor cores (a free speed-up on Ampere+; no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
