"""The server's TLS: PEM files checked before any model loads, read again when they change.

gRPC fails on a bad file only when it binds the port, after every model has loaded, with a
message that names no file; an expired certificate it serves without a word, and every
client's handshake fails while health says SERVING. So the files are checked here first:
PEM, the key the certificate's, not encrypted, every certificate within its dates (a warning
when one expires within ``WARN_DAYS``).

The credentials are gRPC's dynamic ones: at each new connection's handshake (at most once a
second) the files are looked at again, and when they changed and pass the same checks, new
connections get them, with no restart: cert-manager, or a Kubernetes Secret mounted as
files, renews a certificate in place. A change that does not pass (a key written before its
certificate, say) is logged, and the certificate in force stays.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc

from quantgate.errors import ServeError
from quantgate.serve.config import TLSConfig

log = logging.getLogger(__name__)

WARN_DAYS = 14  # a certificate that expires sooner is warned about at each read
RECHECK_S = 1.0  # how often a handshake looks for changed files
CERT = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class Material:
    """The PEM bytes gRPC serves, checked."""

    cert: bytes  # the server's certificate chain
    key: bytes
    client_ca: bytes | None
    expires: datetime  # the earliest end of validity in the server's chain (UTC)


def read(tls: TLSConfig, now: datetime | None = None) -> Material:
    """The files of ``tls``, checked (module docstring); a ServeError names the file and
    what to do."""
    cert = _read_pem("--tls-cert", tls.cert, CERT)
    key = _read_pem("--tls-key", tls.key, b"PRIVATE KEY-----")
    ca = _read_pem("--tls-client-ca", tls.client_ca, CERT) if tls.client_ca else None
    _check_pair(tls.cert, tls.key)
    now = now or datetime.now(timezone.utc)
    expires = _check_dates("--tls-cert", tls.cert, cert, now)
    if ca is not None:
        _check_dates("--tls-client-ca", tls.client_ca, ca, now)
    return Material(cert, key, ca, expires)


class Credentials:
    """gRPC server credentials over ``tls``'s files, read (and checked) now, and again when
    they change (module docstring)."""

    def __init__(self, tls: TLSConfig):
        self.tls = tls
        self._on_read: Callable[[Material], None] = lambda material: None
        self._stamp = self._stat()
        self.material = read(tls)
        self._next = time.monotonic() + RECHECK_S
        self._lock = threading.Lock()

    def watch(self, on_read: Callable[[Material], None]) -> None:
        """Tell ``on_read`` of the material in force now, and of every read from here."""
        self._on_read = on_read
        on_read(self.material)

    def grpc(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self.material),
            self._fetch,
            require_client_authentication=self.tls.client_ca is not None,
        )

    def _stat(self) -> tuple:
        files = (self.tls.cert, self.tls.key, self.tls.client_ca)
        stamps = []
        for path in files:
            try:
                st = os.stat(path) if path is not None else None
            except OSError:  # being replaced: it counts as changed, and is looked at again
                st = None
            stamps.append(None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC asks at each handshake: a new configuration, or None to keep the one in
        force. It must not raise (gRPC would fail the handshake)."""
        if time.monotonic() < self._next or not self._lock.acquire(blocking=False):
            return None
        try:
            self._next = time.monotonic() + RECHECK_S
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            try:
                material = read(self.tls)
            except ServeError as e:
                log.error("TLS files changed: %s; the certificate in force stays", e)
                return None
            self.material = material
            log.info(
                "TLS files changed: serving %s to new connections (valid until %s)",
                self.tls.cert, f"{material.expires:%Y-%m-%d %H:%M} UTC",
            )  # fmt: skip
            self._on_read(material)
            return _configuration(material)
        except Exception:  # noqa: BLE001 - never into gRPC's handshake
            log.exception("reading the TLS files again failed; the certificate in force stays")
            return None
        finally:
            self._lock.release()


def _configuration(m: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(m.key, m.cert)], root_certificates=m.client_ca
    )


def _check_dates(flag: str, path: Path, pem: bytes, now: datetime) -> datetime:
    """Refuse a certificate in ``pem`` past its end of validity or before its start; warn
    of one that ends within WARN_DAYS. Returns the earliest end of validity."""
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ServeError(f"{flag} {path}: cannot read its certificates ({e})") from e
    for i, c in enumerate(certs):
        which = f"{flag} {path}" + (
            f" (certificate {i + 1} of {len(certs)}, {c.subject.rfc4514_string()})"
            if len(certs) > 1
            else ""
        )
        end, start = c.not_valid_after_utc, c.not_valid_before_utc
        if end < now:
            raise ServeError(
                f"{which} expired on {end:%Y-%m-%d %H:%M} UTC: every client's handshake would "
                "fail. Renew it, and pass the new file"
            )
        if start > now:
            raise ServeError(
                f"{which} is not valid before {start:%Y-%m-%d %H:%M} UTC (now "
                f"{now:%Y-%m-%d %H:%M}): clients would refuse it. Check this host's clock, or "
                "wait"
            )
        if end - now < timedelta(days=WARN_DAYS):
            log.warning("%s expires on %s UTC, in %s: renew it", which,
                        f"{end:%Y-%m-%d %H:%M}", _days(end - now))  # fmt: skip
    return min(c.not_valid_after_utc for c in certs)


def _days(left: timedelta) -> str:
    return f"{left.days} days" if left.days >= 2 else f"{left.total_seconds() / 3600:.0f} hours"


class _Encrypted(Exception):
    pass


def _check_pair(cert: Path, key: Path) -> None:
    """Refuse a key that is not the certificate's, or is encrypted, as OpenSSL reads them
    (the standard library's ssl)."""

    def password() -> bytes:
        raise _Encrypted

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Not OpenSSL's default security level: it refuses keys and signatures gRPC serves
    # (a 1024-bit RSA key), and judging those is not this check's business.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        context.load_cert_chain(cert, key, password=password)
    except _Encrypted:
        raise ServeError(
            f"--tls-key {key} is encrypted, and gRPC takes no password: decrypt it "
            f"(`openssl pkey -in {key} -out plain.key`) and keep that file readable only "
            "by the server's user"
        ) from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ServeError(
                f"--tls-key {key} is not the private key of --tls-cert {cert}: pass the key "
                "the certificate was issued for"
            ) from e
        raise ServeError(
            f"cannot use --tls-cert {cert} with --tls-key {key}: {e.reason or e}"
        ) from e


def _read_pem(flag: str, path: Path, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ServeError(f"cannot read {flag} {path}: {e.strerror or e}") from e
    if marker not in data:
        raise ServeError(
            f"{flag} {path} is not PEM: it has no '{marker.decode()}' line. Pass a PEM file "
            "(`openssl x509 -outform PEM` or `openssl pkey -outform PEM` converts DER)."
        )
    return data
