"""The site's authentication key pair, in the form Flower's SuperNode expects: an ECDSA
key on a NIST curve, OpenSSH encoding. The private key never leaves the site; the public
key goes to the coordinator, who registers it.

    KEY_DIR/site.key   private key (0600)
    KEY_DIR/site.pub   public key: send this file to the coordinator
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.keyfiles import KeyFileError, fingerprint, read_private, write_private, write_public

PRIVATE, PUBLIC = "site.key", "site.pub"


def generate_identity(directory: Path, comment: str = "") -> Path:
    """Write a new key pair into `directory`; returns the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_private(directory / PRIVATE, private)
    write_public(directory / PUBLIC, public + (f" {comment}".encode() if comment else b"") + b"\n")
    return directory / PUBLIC


def check_private_key(path: Path) -> str:
    """Load the site's private key as the SuperNode will; returns its public fingerprint."""
    try:
        key = serialization.load_ssh_private_key(read_private(path), None)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(
            f"{path}: not an OpenSSH ECDSA private key; make one with fedtune-site keygen"
        ) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: the key must be ECDSA (fedtune-site keygen makes one)")
    return fingerprint(key.public_key())
