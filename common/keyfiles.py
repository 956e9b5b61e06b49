"""Key and certificate files on disk: private keys 0600, written once, never overwritten.

Both roles write keys (the coordinator its CA and TLS key, a site its authentication key),
so the rules for writing them live here, in one place.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


class KeyFileError(RuntimeError):
    """A key or certificate file is missing, unreadable, or would be overwritten."""


def write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 (no moment at which others could read it); refuse to
    replace an existing key, which would orphan every certificate or registration made
    with it."""
    _write(path, data, PRIVATE_MODE)


def write_public(path: Path, data: bytes) -> None:
    """Create a certificate or public key file, mode 0644; refuse to replace one."""
    _write(path, data, PUBLIC_MODE)


def read_private(path: Path) -> bytes:
    """A private key's bytes; refused when others may read it, as ssh does."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the key ({e.strerror})") from e
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: private key is readable by others (mode {mode:04o}); run: chmod 600 {path}"
        )
    return data


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A site's public key file (OpenSSH ECDSA), as the coordinator receives it."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the public key ({e.strerror})") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(
            f"{path}: not an OpenSSH public key; the site makes it with fedtune-site keygen"
        ) from e
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileError(f"{path}: the key must be ECDSA on a NIST curve, got {type(key)}")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA256 fingerprint as ssh-keygen -l prints it, for reading out over the phone."""
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(blob.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as e:
        raise KeyFileError(
            f"{path} already exists; keys are never overwritten. Move it away first if you "
            "really mean to replace it (everything issued or registered with it stops working)"
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, mode)  # the umask may have narrowed it; never widened
    except BaseException:
        path.unlink(missing_ok=True)
        raise
