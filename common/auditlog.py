"""The hash-chained, signed audit log's format: appending a line and verifying the whole.
The coordinator writes it (server/audit.py says what goes in); a site verifies it
(`fedtune-site audit`). Each line holds the hash of the line before it, so no line can be
changed, dropped or reordered without breaking the chain, and the coordinator signs each
line's hash (Ed25519) so a site can check the log came from it.

    {...entry, "prev": "<hash of the line before>", "hash": "<sha256 of prev + entry>",
     "signature": "<hex Ed25519 signature of hash>"}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.files import append_line, storage_error

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
_SEAL_FIELDS = ("prev", "hash", "signature")


class AuditError(ValueError):
    """The audit log does not verify; the message names the line and what is wrong."""


def append_entry(
    run_dir: Path, entry: Mapping[str, Any], key: Ed25519PrivateKey | None
) -> dict[str, Any]:
    """Chain `entry` to the log's last line, sign it, and append it durably."""
    path = run_dir / AUDIT_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    prev = json.loads(lines[-1])["hash"] if lines else GENESIS
    digest = _hash(prev, entry)
    sealed = {**entry, "prev": prev, "hash": digest}
    if key is not None:
        sealed["signature"] = key.sign(bytes.fromhex(digest)).hex()
    try:
        append_line(path, json.dumps(sealed, sort_keys=True))
    except OSError as e:
        raise storage_error(e, run_dir, "run directory") from e
    return sealed


def verify_log(path: Path, key: Ed25519PublicKey | None = None) -> list[dict[str, Any]]:
    """Every entry of an audit log, after checking the chain (and, given the coordinator's
    public key, every signature); raises AuditError naming the first line that fails."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise AuditError(f"{path}: cannot read the audit log ({e.strerror})") from e
    entries: list[dict[str, Any]] = []
    prev = GENESIS
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            sealed = json.loads(line)
        except json.JSONDecodeError as e:
            raise AuditError(f"{where}: not valid JSON; the log was cut or altered") from e
        entry = {k: v for k, v in sealed.items() if k not in _SEAL_FIELDS}
        if sealed.get("prev") != prev:
            raise AuditError(
                f"{where}: does not follow the line before it (a line was removed, inserted "
                "or reordered)"
            )
        if sealed.get("hash") != _hash(prev, entry):
            raise AuditError(f"{where}: its content does not match its hash (it was altered)")
        if key is not None:
            signature = str(sealed.get("signature", ""))
            try:
                key.verify(bytes.fromhex(signature), bytes.fromhex(sealed["hash"]))
            except (InvalidSignature, ValueError) as e:
                raise AuditError(
                    f"{where}: the signature does not verify against the coordinator's key"
                ) from e
        entries.append(sealed)
        prev = sealed["hash"]
    return entries


def _hash(prev: str, entry: Mapping[str, Any]) -> str:
    body = json.dumps(dict(entry), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{prev}\n{body}".encode()).hexdigest()
