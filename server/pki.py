"""The coordinator's certificates: a private certificate authority and the SuperLink's TLS
certificate for the host names and IP addresses the sites connect to.

    TLS_DIR/ca.pem       CA certificate: give it to every site (it is public)
    TLS_DIR/ca.key       CA private key (0600): keep it offline once certificates are issued
    TLS_DIR/server.pem   SuperLink certificate, signed by the CA
    TLS_DIR/server.key   SuperLink private key (0600)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.keyfiles import KeyFileError, read_private, write_private, write_public

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"


@dataclass(frozen=True)
class TlsFiles:
    """Where the SuperLink's TLS files are."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_CERT

    @property
    def cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def key(self) -> Path:
        return self.directory / SERVER_KEY

    def missing(self) -> list[Path]:
        return [p for p in (self.ca, self.cert, self.key) if not p.is_file()]


def create_ca(directory: Path, name: str, days: int = 3650) -> Path:
    """Create the certificate authority; returns the CA certificate's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    write_private(directory / CA_KEY, _private_pem(key))
    write_public(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return directory / CA_CERT


def issue_server_cert(directory: Path, hosts: list[str], days: int = 825) -> Path:
    """Sign a SuperLink certificate for `hosts` (names and IP addresses) with the CA in
    `directory`; returns the certificate's path."""
    if not hosts:
        raise ValueError("give at least one host name or IP address the sites will dial")
    ca_cert = x509.load_pem_x509_certificate(_read(directory / CA_CERT))
    ca_key = serialization.load_pem_private_key(read_private(directory / CA_KEY), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{directory / CA_KEY}: not the EC key fedtune-server ca writes")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_private(directory / SERVER_KEY, _private_pem(key))
    write_public(directory / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return directory / SERVER_CERT


def certificate_hosts(path: Path) -> list[str]:
    """The names and addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(_read(path))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in names]


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or any(c.isspace() or c in "/:@" for c in host):
            raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
        return x509.DNSName(host)


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read ({e.strerror}); run fedtune-server ca") from e
