"""Writing files so that a crash never leaves a half-written one behind."""

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def _ordinary_mode() -> int:
    """The permissions a new file gets from the umask (0o644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temporary_path)` for a temporary file beside `path`, then rename it to `path`.

    The rename is atomic: readers see the old file or the new one, never a partial one. If `write`
    raises, the temporary file is removed and `path` is untouched. The file gets the usual permissions
    (the umask's), even when `write` creates it private, as safetensors does.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, _ordinary_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
