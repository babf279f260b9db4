"""Writing files so that a crash never leaves a half-written one behind."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temporary_path)` for a temporary file beside `path`, then rename it to `path`.

    The rename is atomic: readers see the old file or the new one, never a partial one. If `write`
    raises, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
