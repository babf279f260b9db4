"""benchmarks/gpu_check.py: its checks run on the CPU, tiny, and a failure is reported, not swallowed."""
import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_check_passes_on_the_cpu(capsys):
    gpu_check = load_gpu_check()
    assert gpu_check.main(["--device", "cpu", "--tiny", "--skip", "compile"]) == 0     # compile: a minute here
    out = capsys.readouterr().out
    assert "11 of 11 checks passed" in out and "FAIL" not in out and "ok   FSDP, one process" in out
    assert "gloo" in out and "cached = recomputed" in out and "equal value and gradients" in out
    assert "in the same time: baseline" in out and "modern 6 steps" in out


def test_a_failing_check_is_reported_and_fails_the_run(capsys, monkeypatch):
    gpu_check = load_gpu_check()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(gpu_check, "attention_check", broken)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--only", "attention", "chat"]) == 1
    out = capsys.readouterr().out
    assert "FAIL flash attention" in out and "illegal memory access" in out and "ok   chat" in out
    assert "1 of 2 checks passed" in out and "FAILED: flash attention" in out


def test_without_a_gpu_it_says_so_and_exits_cleanly(capsys, monkeypatch):
    gpu_check = load_gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA GPU on this machine" in capsys.readouterr().out
