"""Signed global adapters: the coordinator signs every adapter it sends (Ed25519), and a
site checks the signature against the coordinator's public key, which it was given out of
band like `ca.pem`, before it trains on the adapter or scores it.

What is signed is one line naming the run, the round and the sha256 of the adapter's
arrays (names, dtypes, shapes and bytes, in name order), so an adapter cannot be altered,
swapped for another, or replayed into another round without the site noticing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.keyfiles import KeyFileError, read_private, write_private, write_public

DIGEST = "adapter-sha256"
SIGNATURE = "adapter-signature"
"""ConfigRecord keys that carry the seal beside the adapter."""
PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class SignatureError(ValueError):
    """An adapter's seal is missing or does not verify; the site refuses the adapter."""


def adapter_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def seal(
    key: Ed25519PrivateKey, run_id: int, server_round: int, arrays: Mapping[str, np.ndarray]
) -> dict[str, str | bytes]:
    """The config entries that let a site check this adapter came from the coordinator."""
    digest = adapter_digest(arrays)
    return {DIGEST: digest, SIGNATURE: key.sign(_statement(run_id, server_round, digest))}


def check_seal(
    key: Ed25519PublicKey,
    run_id: int,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    config: Mapping[str, object],
) -> str:
    """Raise SignatureError unless `config` holds a valid seal for `arrays`; returns the
    adapter's sha256."""
    signature = config.get(SIGNATURE)
    if not isinstance(signature, bytes):
        raise SignatureError(
            f"round {server_round}: the global adapter is not signed, and this site requires "
            "a signature (its coordinator key is set); refused"
        )
    digest = adapter_digest(arrays)
    try:
        key.verify(signature, _statement(run_id, server_round, digest))
    except InvalidSignature as e:
        raise SignatureError(
            f"round {server_round}: the global adapter's signature does not verify against "
            "the coordinator's public key: it was altered, or signed by another key; refused"
        ) from e
    return digest


def create_signing_key(directory: Path) -> Path:
    """Write a new Ed25519 key pair (signing.key 0600, signing.pub); returns the public file."""
    key = Ed25519PrivateKey.generate()
    write_private(
        directory / PRIVATE_NAME,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_public(directory / PUBLIC_NAME, public)
    return directory / PUBLIC_NAME


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The coordinator's private signing key (refused when others can read it)."""
    try:
        key = serialization.load_pem_private_key(read_private(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path}: not a PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: the signing key must be Ed25519")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """The coordinator's public signing key, as a site was given it."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the coordinator's key ({e.strerror})") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path}: not a PEM public key (the coordinator's {PUBLIC_NAME})") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: the coordinator's key must be Ed25519")
    return key


def _statement(run_id: int, server_round: int, digest: str) -> bytes:
    return f"fedtune global adapter v1 run={run_id} round={server_round} sha256={digest}".encode()
