"""Writing the files a user sees: atomically, with the folder's normal permissions, with errors that name the path.

`write_atomic` writes a temp file with a unique name next to the target, flushes and fsyncs it, renames it over the
target with `os.replace` and fsyncs the folder, so readers see the old file or the new one, never a part of one. The
temp file is created as `open()` creates files (mode 0o666 minus the umask, never mkstemp's 0600), and the rename
keeps that mode. `check_room` refuses, before any work, a folder that cannot take a new file or lacks the space.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from .errors import CIDMInputError

# `.<target name>.<8 hex digits>.tmp`: what a killed writer may leave; its folder's owner sweeps them.
TEMP_PATTERN = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def write_error(path: Path, error: OSError, input_name: str) -> CIDMInputError:
    """The CIDMInputError for `input_name` that says an OS error stopped a write to `path`, and what to do."""
    if error.errno in _FULL:
        advice = f"free space on the drive that holds {path.parent}, or choose a folder on another drive"
    elif error.errno in _DENIED:
        advice = (f"make {path.parent} writable (its permissions, or a drive mounted read-only), or choose a "
                  "writable folder")
    else:
        advice = "check the drive"
    return CIDMInputError(input_name, f"cannot write {path}: {error.strerror or error}; {advice}, then run again")


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op on Windows, which cannot open a folder; its os.replace is
    durable enough there)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, input_name: str = "library") -> None:
    """Replace `path` with `data` so that readers see either the old or the new file, never a partial one.

    A random temp name means a temp file left by a killed process never blocks a later write, and "x" mode never
    follows or replaces anything already there.

    Raises:
        CIDMInputError: (`input_name`, from `write_error`) naming `path` and what to do, when the OS refuses the
            write (a full disk, a read-only folder); nothing is left behind then.
    """
    path = Path(path)
    temp_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp_path, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
        fsync_folder(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        if isinstance(error, OSError):
            raise write_error(path, error, input_name) from error
        raise


def check_room(folder: Path, needed: int, input_name: str) -> None:
    """Refuse, before any work, a folder that cannot take `needed` more bytes in new files.

    While `folder` does not exist, the nearest existing folder above it is checked instead, and nothing is created.
    The check creates an anonymous temp file there (gone when closed) and reads the drive's free space.

    Raises:
        CIDMInputError: (`input_name`) naming the folder, the space needed and free, and what to do.
    """
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.parents) if path.is_dir())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise CIDMInputError(input_name, f"cannot create files in {existing}: {error.strerror or error}; make it "
                                         "writable (its permissions, or a drive mounted read-only) or choose a "
                                         "writable folder, then run again") from None
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise CIDMInputError(input_name, f"{folder} needs {mib(needed)} free, its drive has {mib(free)}; free "
                                         "space on that drive or choose a folder on another drive, then run again")
