"""Writing files so that a crash never leaves a half-written one behind."""

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temporary_path)` for a temporary file beside `path`, then rename it to `path`.

    The rename is atomic: readers see the old file or the new one, never a partial one. If `write`
    raises, the temporary file is removed and `path` is untouched. `write` creates the temporary file
    itself, so it gets the usual permissions (the umask's), not a private temporary file's.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
