"""Real file-system faults for tests: a folder nothing may be written into, and a small drive that is nearly full.

root ignores permission bits, so as root a folder is made read-only with the immutable attribute (`chattr +i`) and a
small drive is a tmpfs mount; elsewhere the folder's write bits are cleared, and a small drive needs root. A test
skips where its fault cannot be made.
"""

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


def _run(*command: str) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path: Path):
    """`path` (a folder or a file) refuses every write inside the block."""
    if os.geteuid() == 0:
        if not _run("chattr", "+i", str(path)):
            pytest.skip("chattr +i is not available here")
        try:
            yield
        finally:
            _run("chattr", "-i", str(path))
    else:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)


@contextlib.contextmanager
def nearly_full(folder: Path, free: int, size: int = 1 << 20):
    """A `size`-byte tmpfs mounted at `folder` (created if absent, then empty) with about `free` bytes left: the rest
    is held by the file `filler` in it."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        drive = os.statvfs(folder)
        (folder / "filler").write_bytes(b"\0" * (drive.f_bavail * drive.f_frsize - free))
        yield folder
    finally:
        _run("umount", str(folder))
