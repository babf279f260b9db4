import os
from pathlib import Path

import pytest

from shared.files import atomic_write


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    assert atomic_write(target, lambda tmp: Path(tmp).write_text("new")) == target
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def half_then_crash(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_written_file_gets_ordinary_permissions(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write(tmp_path / "atomic.txt", lambda tmp: Path(tmp).write_text("x"))
    assert atomic.stat().st_mode == plain.stat().st_mode


def test_a_file_its_writer_made_private_gets_ordinary_permissions(tmp_path):
    """safetensors' save_file creates its file 0600; a checkpoint should be readable like any file."""
    import torch
    from safetensors.torch import save_file

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    private = atomic_write(tmp_path / "private.txt",
                           lambda tmp: os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)))
    weights = atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, tmp))
    assert private.stat().st_mode == weights.stat().st_mode == plain.stat().st_mode
