"""The server's TLS: PEM files checked before any model loads, read again when they change.

gRPC fails on a bad file only when it binds the port, after every model has loaded, with a
message that names no file; an expired certificate it serves without a word, and every
client's handshake fails while health says SERVING. So the files are checked here first:
PEM, the key the certificate's, not encrypted, the server's own certificate within its
dates and at least one client CA within theirs (``check_dates``; a warning for any
certificate out of its dates or ending within ``WARN_DAYS``, at start and daily).

The credentials are gRPC's dynamic ones, over files watched for changes (``watch.Watched``,
every second, off the handshake): when they change and pass the same checks, new
connections get them with no restart, as cert-manager or a Kubernetes Secret mounted as
files renews a certificate in place. A change that does not pass (a key written before its
certificate, say) is logged and tried again, and the certificate in force stays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc

from quantgate import fsutil
from quantgate.errors import ServeError
from quantgate.serve.config import TLSConfig
from quantgate.serve.watch import Watched

log = logging.getLogger(__name__)

WARN_DAYS = 14  # a certificate that expires sooner is warned about at each read, and daily
DAY_S = 86400.0
CERT = b"-----BEGIN CERTIFICATE-----"
KEY = b"PRIVATE KEY-----"  # of any kind: "BEGIN PRIVATE KEY", "BEGIN EC PRIVATE KEY", ...


@dataclass(frozen=True)
class Material:
    """The PEM bytes gRPC serves, checked."""

    cert: bytes  # the server's certificate chain, its own certificate first
    key: bytes
    client_ca: bytes | None
    expires: datetime  # the end of the server's own certificate's validity (UTC)


def read(tls: TLSConfig, now: datetime | None = None) -> Material:
    """The files of ``tls``, checked (module docstring); a ServeError names the file and
    what to do."""
    for flag, path in (
        ("--tls-cert", tls.cert),
        ("--tls-key", tls.key),
        ("--tls-client-ca", tls.client_ca),
    ):
        if path is not None:
            fsutil.secret_file(flag, path, secret=flag == "--tls-key", error=ServeError)
    cert = read_pem("--tls-cert", tls.cert, CERT)
    key = read_pem("--tls-key", tls.key, KEY)
    ca = read_pem("--tls-client-ca", tls.client_ca, CERT) if tls.client_ca else None
    expires = check_dates(tls, cert, ca, now)  # the certificates readable first
    check_pair(cert, key, cert=f"--tls-cert {tls.cert}", key=f"--tls-key {tls.key}",
               key_file=tls.key)  # fmt: skip
    return Material(cert, key, ca, expires)


def check_dates(
    tls: TLSConfig, cert: bytes, ca: bytes | None, now: datetime | None = None
) -> datetime:
    """Refuse the server's own certificate out of its dates, or client CAs none of which is
    within them (an old CA beside its successor, as during a CA's rotation, is only warned
    about: OpenSSL skips it); warn of any certificate that is out of its dates or ends
    within WARN_DAYS. Returns the end of the server's own certificate."""
    now = now or datetime.now(timezone.utc)
    served = _certificates("--tls-cert", tls.cert, cert)
    for i, c in enumerate(served):  # the first is the server's own; the rest its chain
        problem = _outside(c, now)
        if problem and i == 0:
            raise ServeError(f"--tls-cert {tls.cert} {problem}: every client's handshake "
                             "would fail. Renew it, and pass the new file")  # fmt: skip
        _warn(f"--tls-cert {tls.cert}", served, i, now, problem)
    if ca is not None:
        cas = _certificates("--tls-client-ca", tls.client_ca, ca)
        problems = [_outside(c, now) for c in cas]
        if all(problems):
            raise ServeError(
                f"--tls-client-ca {tls.client_ca}: no CA in it is within its dates "
                f"({'; '.join(p for p in problems if p)}): every client certificate would be refused"
            )
        for i, problem in enumerate(problems):
            _warn(f"--tls-client-ca {tls.client_ca}", cas, i, now, problem)
    return served[0].not_valid_after_utc


class Credentials:
    """gRPC server credentials over ``tls``'s files, read (and checked) now and, once
    ``watch`` starts it (until ``close``), again when they change (``watch.Watched``):
    gRPC asks for them at each handshake and gets what the watch read last, without
    touching a file. The certificates' dates are checked again daily, for the warning
    before one expires."""

    def __init__(self, tls: TLSConfig):
        self.tls = tls
        files = [tls.cert, tls.key, *([tls.client_ca] if tls.client_ca else [])]
        self._watch = Watched(
            "the TLS files",
            files,
            lambda: read(tls),
            kept="the certificate in force stays",
            on_load=self._loaded,
            on_tick=self._daily,
        )
        self._served = self.material  # the material gRPC has
        self._on_read: Callable[[Material], None] = lambda material: None
        self._next_check = time.monotonic() + DAY_S

    @property
    def material(self) -> Material:
        return self._watch.value

    def watch(self, on_read: Callable[[Material], None] = lambda material: None) -> None:
        """Tell ``on_read`` of the material in force now and of every new one, and start
        watching the files."""
        self._on_read = on_read
        on_read(self.material)
        self._watch.start()

    def close(self) -> None:
        """End the watch (its thread ends within a second)."""
        self._watch.stop()

    def check(self) -> bool:
        """Look at the files now (the watch's thread does every second)."""
        return self._watch.check()

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self.material),
            self._fetch,
            require_client_authentication=self.tls.client_ca is not None,
        )

    def _loaded(self, material: Material) -> None:
        log.info(
            "TLS files changed: serving %s to new connections (valid until %s)",
            self.tls.cert, f"{material.expires:%Y-%m-%d %H:%M} UTC",
        )  # fmt: skip
        self._on_read(material)

    def _daily(self) -> None:
        if time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + DAY_S
        m = self.material
        try:  # warns of what ends soon; what has ended is an error the log must show
            check_dates(self.tls, m.cert, m.client_ca)
        except ServeError as e:
            log.error("%s", e)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC asks at each handshake (on its dispatch thread): the new configuration when
        the watch read one since, else None to keep the one in force."""
        material = self.material
        if material is self._served:
            return None
        self._served = material
        return _configuration(material)


def _configuration(m: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(m.key, m.cert)], root_certificates=m.client_ca
    )


def _certificates(flag: str, path: Path | None, pem: bytes) -> list:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ServeError(f"{flag} {path}: cannot read its certificates ({e})") from e


def _outside(c, now: datetime) -> str | None:
    """How certificate ``c`` is out of its dates at ``now``, or None."""
    end, start = c.not_valid_after_utc, c.not_valid_before_utc
    if end < now:
        return f"expired on {end:%Y-%m-%d %H:%M} UTC"
    if start > now:
        return (
            f"is not valid before {start:%Y-%m-%d %H:%M} UTC (now {now:%Y-%m-%d %H:%M}; "
            "check this host's clock)"
        )
    return None


def _warn(where: str, certs: list, i: int, now: datetime, problem: str | None) -> None:
    """Warn of certificate ``i`` of ``certs`` (from ``where``) out of its dates, or ending
    within WARN_DAYS."""
    c = certs[i]
    which = where + (
        f" (certificate {i + 1} of {len(certs)}, {c.subject.rfc4514_string()})"
        if len(certs) > 1
        else ""
    )
    if problem:
        log.warning("%s %s", which, problem)
    elif (left := c.not_valid_after_utc - now) < timedelta(days=WARN_DAYS):
        log.warning("%s expires on %s UTC, in %s: renew it", which,
                    f"{c.not_valid_after_utc:%Y-%m-%d %H:%M}", _days(left))  # fmt: skip


def _days(left: timedelta) -> str:
    days = left.total_seconds() / 86400
    return f"{days:.1f} days" if days >= 2 else f"{left.total_seconds() / 3600:.0f} hours"


def check_pair(
    cert_pem: bytes, key_pem: bytes, *, cert: str, key: str, key_file: Path, error=ServeError
) -> None:
    """Refuse a key that is not the certificate's, or is encrypted (gRPC takes no
    password), as an ``error`` naming them as ``cert`` and ``key`` ("--tls-cert FILE", or a
    client's words). Judged on the bytes read, which are what gRPC uses (a renewal landing
    between two reads of the files would otherwise pass the check on files the used bytes
    are not)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # it wants a password
        raise error(
            f"{key} is encrypted, and gRPC takes no password: decrypt it "
            f"(`openssl pkey -in {key_file} -out plain.key`) and keep that file readable only "
            "by its user"
        ) from None
    except ValueError as e:
        raise error(f"cannot use {key}: {e}") from e
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    own = x509.load_pem_x509_certificates(cert_pem)[0].public_key().public_bytes(*spki)
    if private.public_key().public_bytes(*spki) != own:
        raise error(
            f"{key} is not the private key of {cert}: pass the key the certificate was issued for"
        )


def read_pem(named: str, path: Path, marker: bytes, error=ServeError) -> bytes:
    """The PEM file at ``path``, or an ``error`` naming it as ``named`` ("--tls-cert", or a
    client's words): gRPC takes bad bytes without a word, then fails every handshake."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {named} {path}: {e.strerror or e}") from e
    if marker not in data:
        raise error(
            f"{named} {path} is not PEM: it has no '{marker.decode()}' line. Pass a PEM file "
            "(`openssl x509 -outform PEM` or `openssl pkey -outform PEM` converts DER)."
        )
    return data
