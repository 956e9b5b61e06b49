"""Files that are complete or absent: atomic writes, directories swapped in by renames, and
storage failures (no permission, read-only, disk full) turned into one error that names the
path and the fix. Whatever fails, the previous version of a file stays as it was."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM)


class StorageError(OSError):
    """A directory cannot be written; the message names it, the cause and the fix."""


def storage_error(error: OSError, path: Path, what: str, then: str = "") -> StorageError:
    """`error` (from writing under `path`) as one message naming `what` the path is for."""
    where = f"{what} {path}"
    if error.errno in _FULL:
        free = _free_bytes(path)
        shown = f"; {free / 1e6:.1f} MB free now" if free is not None else ""
        message = (
            f"{where}: the disk is full ({error.strerror}{shown}); free space on that disk "
            "or choose a directory on another"
        )
    elif error.errno in _DENIED:
        message = (
            f"{where}: no permission to write there ({error.strerror}); choose a directory "
            f"this user ({_user()}) can write, or grant it write access"
        )
    elif error.errno == errno.EROFS:
        message = f"{where}: the file system is read-only; choose a writable directory"
    else:
        message = f"{where}: cannot write ({error.strerror or error}); check the directory"
    return StorageError(message + (f". {then}" if then else ""))


def check_writable(directory: Path, what: str) -> Path:
    """Create `directory` if needed and prove a file can be made in it; returns it resolved.

    Run before long work starts, so that a wrong path fails in seconds, not after a round.
    """
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".fedtune-probe."):
            pass
    except OSError as e:
        raise storage_error(e, directory, what) from e
    return directory.resolve()


def warn_if_short(directory: Path, needed: int, what: str) -> None:
    """Log a warning when `directory`'s disk has less than `needed` bytes free."""
    free = _free_bytes(directory)
    if free is not None and free < needed:
        log.warning(
            "%s %s: %.1f MB free, about %.1f MB needed; the run stops with an error if the "
            "disk fills (it can be resumed from its last checkpoint)",
            what,
            directory,
            free / 1e6,
            needed / 1e6,
        )


def write_atomic(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Write a file atomically and durably: a reader sees the old or the new content, never
    a mix; on failure the temporary file is removed and the old content is untouched."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line to a log durably. If the write fails (a full disk), the file is cut
    back to its previous length, so no half line stays behind, and the OSError is raised."""
    with path.open("ab") as f:
        size = f.tell()
        try:
            f.write((line + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            f.truncate(size)
            raise


def fsync_file(path: Path) -> None:
    """Flush a file written by another library to the disk."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A fresh hidden directory beside `target` to fill; removed if the block fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`, replacing what was there, by renames only."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"
