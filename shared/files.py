"""Writing files so that a crash never leaves a half-written one behind."""

import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

NEARLY_FULL_BYTES = 16 * 2**20       # free space below which a failed write is put down to a full disk


class DiskFullError(OSError):
    """A file could not be written because its disk is full; the file it would have replaced is untouched."""


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether `error`, raised while writing into `folder`, comes from a full disk: ENOSPC, the words of it in
    another library's error (safetensors), or, for writers that say only that a write fell short (torch.save's
    "unexpected pos"), less than NEARLY_FULL_BYTES left."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def _ordinary_mode() -> int:
    """The permissions a new file gets from the umask (0o644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temporary_path)` for a temporary file beside `path`, then rename it to `path`.

    The rename is atomic: readers see the old file or the new one, never a partial one. If `write`
    raises, the temporary file is removed and `path` is untouched; a full disk is a DiskFullError that says
    how far the file got. The file gets the usual permissions (the umask's), even when `write` creates it
    private, as safetensors does.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, _ordinary_mode())
        os.replace(tmp, path)
    except Exception as err:
        if not disk_full(err, path.parent):
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        raise DiskFullError(f"the disk holding {path.parent} is full: {path.name} got {written / 2**20:.1f} MB "
                            f"written and needs more; free some space and run again") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
