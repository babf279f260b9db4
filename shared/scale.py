"""One notebook, three sizes.

`LLM_SCALE` picks how big every size-dependent hyperparameter is:

- ``smoke``: tests and CI; every cell runs in seconds.
- ``cpu``: a reader on a laptop; real learning in minutes on two cores.
- ``gpu``: a reader on Colab or a workstation; the full-size runs.

Unset, it is ``gpu`` when CUDA is available and ``cpu`` otherwise.
"""

from __future__ import annotations

import os
from typing import TypeVar

SCALES = ("smoke", "cpu", "gpu")
ENV_VAR = "LLM_SCALE"

T = TypeVar("T")


def get_scale() -> str:
    """The scale in force now: `LLM_SCALE` if set, else ``gpu`` with CUDA, else ``cpu``."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value:
        if value not in SCALES:
            raise ValueError(f"{ENV_VAR}={value!r} is not a scale; use one of {', '.join(SCALES)}")
        return value
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def pick(smoke: T, cpu: T, gpu: T, scale: str | None = None) -> T:
    """The value for the current scale (or for `scale` if given).

    >>> pick(smoke=10, cpu=1_000, gpu=100_000, scale="cpu")
    1000
    """
    scale = get_scale() if scale is None else scale
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[scale]
