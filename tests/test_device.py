import random

import numpy as np
import pytest
import torch

from shared import device as dev


def test_cpu_when_nothing_else(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "mps_is_usable", lambda version=None: False)
    assert dev.get_device() == torch.device("cpu")


def test_cuda_first(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.get_device() == torch.device("cuda")


def test_mps_needs_recent_torch(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert not dev.mps_is_usable("2.8.1")
    assert dev.mps_is_usable("2.9.0")
    assert dev.mps_is_usable("2.13.0+cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert not dev.mps_is_usable("2.13.0")


def test_auto_picks_mps_when_usable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "mps_is_usable", lambda version=None: True)
    assert dev.get_device() == torch.device("mps")


def test_asking_for_a_missing_device_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        dev.get_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        dev.get_device("tpu")
    assert dev.get_device("cpu") == torch.device("cpu")


def test_torch_version_tuple():
    assert dev.torch_version_tuple("2.13.0+cpu") == (2, 13)
    assert dev.torch_version_tuple("2.9.0a0+git123") == (2, 9)
    assert dev.torch_version_tuple("3.0") == (3, 0)


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                   ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_bf16_only_where_the_tensor_cores_compute_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)   # emulation says yes
    precision = dev.choose_precision("cuda")
    assert precision.name == expected and precision.use_grad_scaler == (expected == "fp16")


def test_precision_choice_per_device():
    cpu = dev.choose_precision("cpu")
    assert cpu.dtype is None and not cpu.use_grad_scaler and cpu.name == "fp32"
    ampere = dev.choose_precision("cuda", bf16_supported=True)
    assert ampere.dtype == torch.bfloat16 and not ampere.use_grad_scaler and ampere.name == "bf16"
    t4 = dev.choose_precision("cuda", bf16_supported=False)
    assert t4.dtype == torch.float16 and t4.use_grad_scaler and t4.name == "fp16"
    assert dev.choose_precision("mps").dtype is None


def test_autocast_runs_on_cpu():
    x = torch.randn(4, 4)
    with dev.autocast("cpu", dev.choose_precision("cpu")):
        assert (x @ x).dtype == torch.float32
    with dev.autocast("cpu", dev.Precision(torch.bfloat16, False)):
        assert (x @ x).dtype == torch.bfloat16


def test_seed_everything_repeats():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    dev.seed_everything(123)
    first = draw()
    dev.seed_everything(123)
    assert draw() == first
    dev.seed_everything(124)
    assert draw() != first
