"""TLS certificates: refused out of their dates before any model loads, warned about before
they expire, and renewed in place with no restart."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta

import grpc
import pki
import pytest
from conftest import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import until


def _check(repo, cert, key) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantgate", "serve", str(repo / "classifier"), "--check",
         "--tls-cert", str(cert), "--tls-key", str(key)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_certificate_out_of_its_dates_is_refused_and_one_about_to_expire_warned(repo, tmp_path):
    ca = pki.authority()
    expired = pki.server_files(tmp_path / "expired", ca, valid_from=timedelta(days=-30),
                               valid_for=timedelta(days=29))  # fmt: skip
    r = _check(repo, *expired)
    assert r.returncode == 2, r.stderr
    assert f"--tls-cert {expired[0]} expired on" in r.stderr, r.stderr
    assert "every client's handshake would fail" in r.stderr and "ready to serve" not in r.stdout

    early = pki.server_files(tmp_path / "early", ca, valid_from=timedelta(days=2))
    r = _check(repo, *early)
    assert r.returncode == 2 and "is not valid before" in r.stderr, r.stderr
    assert "check this host's clock" in r.stderr

    soon = pki.server_files(tmp_path / "soon", ca, valid_for=timedelta(days=4))  # 3 days left
    r = _check(repo, *soon)
    assert r.returncode == 0, r.stderr
    assert re.search(r"--tls-cert \S+ expires on .* UTC, in 3.0 days: renew it", r.stderr), r.stderr


def test_tls_files_others_may_write_are_refused_and_a_key_all_may_read_warned(repo, tmp_path):
    """Whoever may write the key and certificate serves their own (the server reads them
    again when they change); whoever may write the client CA signs their own clients."""
    cert, key = pki.server_files(tmp_path / "tls", pki.authority())
    key.chmod(0o644)
    r = _check(repo, cert, key)
    assert r.returncode == 0, r.stderr
    assert f"--tls-key {key} may be read by every user of this host (mode 0644)" in r.stderr
    key.chmod(0o666)
    r = _check(repo, cert, key)
    assert r.returncode == 2 and "ready to serve" not in r.stdout, r.stderr
    assert f"--tls-key {key} may be written by every user (mode 0666)" in r.stderr
    key.chmod(0o600)
    cert.chmod(0o646)
    r = _check(repo, cert, key)
    assert r.returncode == 2 and f"--tls-cert {cert} may be written by every user" in r.stderr
    # Debian's umask 002: a group of the user's own, usually; said, not refused
    cert.chmod(0o664)
    r = _check(repo, cert, key)
    assert r.returncode == 0, r.stderr
    assert f"--tls-cert {cert} may be written by its group (mode 0664)" in r.stderr


def _health(url: str, root: bytes) -> int:
    """One health check over a new channel that trusts ``root``."""
    with grpc.secure_channel(url, grpc.ssl_channel_credentials(root)) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=5)
            .status
        )


def test_a_renewed_certificate_is_served_to_new_connections_with_no_restart(repo, tmp_path):
    """cert-manager renews a certificate in place: the files change, and new connections get
    the new certificate. A half-written renewal (the key of one certificate, the other's
    certificate) is logged and the certificate in force stays. The expiry metric follows."""
    old_ca, new_ca = pki.authority("old CA"), pki.authority("new CA")
    live = tmp_path / "live"
    cert, key = pki.server_files(live, old_ca, valid_for=timedelta(days=30))
    srv = ServerProcess(repo / "classifier", "--tls-cert", str(cert), "--tls-key", str(key),
                        "--metrics-port", "0")  # fmt: skip
    url = f"localhost:{srv.url.rsplit(':', 1)[1]}"
    metrics = re.search(r"metrics on (http://\S+/metrics)", "".join(srv.stdout)).group(1)

    def expiry() -> float:
        text = urllib.request.urlopen(metrics, timeout=10).read().decode()
        found = re.search(
            r"^quantgate_tls_cert_expiry_timestamp_seconds\{[^}]*\} (\S+)$", text, re.M
        )
        assert found, text
        return float(found.group(1))

    try:
        assert _health(url, pki.pem(old_ca[0])) == health_pb2.HealthCheckResponse.SERVING
        first = expiry()
        assert 28 * 86400 < first - time.time() < 29 * 86400  # valid from a day ago

        renewed = pki.server_files(tmp_path / "renewed", new_ca, valid_for=timedelta(days=90))
        shutil.copyfile(renewed[1], key)  # the key first: for a moment the pair disagrees
        until(lambda: "is not the private key of --tls-cert" in srv.log, timeout=30)
        assert "the certificate in force stays" in srv.log, srv.log
        # the old pair is still served, whole: a client of the old CA is answered
        assert _health(url, pki.pem(old_ca[0])) == health_pb2.HealthCheckResponse.SERVING
        shutil.copyfile(renewed[0], cert)  # then the certificate

        deadline = time.monotonic() + 20
        while True:
            try:
                assert _health(url, pki.pem(new_ca[0])) == health_pb2.HealthCheckResponse.SERVING
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, srv.log
                time.sleep(0.3)
        with pytest.raises(grpc.RpcError):  # a client that trusts only the old CA
            _health(url, pki.pem(old_ca[0]))
        until(lambda: "TLS files changed: serving" in srv.log)  # logged once it is in force
        assert 88 * 86400 < expiry() - time.time() < 89 * 86400
    finally:
        assert srv.terminate() == 0, srv.log
