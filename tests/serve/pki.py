"""Certificates for the TLS tests, made with cryptography: any validity period, in PEM."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def authority(cn: str = "test CA", valid_for: timedelta = timedelta(days=365)):
    """A self-signed CA, valid from two days ago for ``valid_for`` more: (certificate,
    key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=2))
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def server_files(
    out: Path,
    ca,
    *,
    valid_from: timedelta = timedelta(days=-1),
    valid_for: timedelta = timedelta(days=90),
) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 signed by ``ca``, valid from now +
    ``valid_from`` for ``valid_for``, written as PEM; returns (certificate file, key file)."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.now(timezone.utc) + valid_from
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + valid_for)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = out / "server.pem", out / "server.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)  # as openssl and certbot leave a key: its owner's alone
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
