import pytest

from shared import scale


def test_pick_follows_env(monkeypatch):
    for name, expected in [("smoke", 1), ("cpu", 2), ("gpu", 3), (" CPU ", 2)]:
        monkeypatch.setenv("LLM_SCALE", name)
        assert scale.pick(smoke=1, cpu=2, gpu=3) == expected


def test_explicit_scale_overrides_env(monkeypatch):
    monkeypatch.setenv("LLM_SCALE", "smoke")
    assert scale.pick(smoke="s", cpu="c", gpu="g", scale="gpu") == "g"


def test_unset_means_gpu_only_with_cuda(monkeypatch):
    monkeypatch.delenv("LLM_SCALE", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert scale.get_scale() == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert scale.get_scale() == "gpu"


def test_bad_scale_names_the_choices(monkeypatch):
    monkeypatch.setenv("LLM_SCALE", "huge")
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        scale.get_scale()
    with pytest.raises(ValueError, match="unknown scale 'tiny'"):
        scale.pick(1, 2, 3, scale="tiny")


def test_suite_runs_at_smoke_scale():
    # conftest.py sets this for the unit tests and for the notebook kernels nbval starts
    import os

    assert os.environ["LLM_SCALE"] == "smoke"
