"""Files read again when they change (serve/watch.py), and the TLS dates policy that
decides whether a renewal is taken (serve/tls.py)."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

import pki
import pytest

from quantgate.errors import ConfigError, ServeError
from quantgate.serve import tls
from quantgate.serve.config import TLSConfig
from quantgate.serve.watch import Watched


def test_a_failed_load_is_logged_once_and_tried_again_until_it_succeeds(tmp_path, caplog):
    """Some causes pass with the files untouched (a certificate's start of validity
    arriving, permissions fixed): the load is tried again, and logged once meanwhile."""
    f = tmp_path / "tokens"
    f.write_text("a\n")
    broken = [False]

    def load() -> str:
        if broken[0]:
            raise ConfigError("cannot read it")
        return f.read_text().strip()

    loaded = []
    w = Watched("the file", [f], load, kept="the old one stays", on_load=loaded.append)
    assert w.value == "a" and not w.check()  # unchanged: nothing read
    f.write_text("bb\n")
    broken[0] = True
    with caplog.at_level(logging.ERROR, logger="quantgate.serve.watch"):
        assert not w.check() and not w.check() and not w.check()
    assert w.value == "a" and caplog.text.count("cannot read it; the old one stays") == 1
    broken[0] = False  # fixed, the file as it was: taken at the next look
    assert w.check() and w.value == "bb" and loaded == ["bb"]
    assert not w.check()


def test_a_watch_thread_picks_up_a_change(tmp_path):
    f = tmp_path / "v"
    f.write_text("1")
    w = Watched("v", [f], f.read_text, kept="", interval=0.05).start()
    try:
        f.write_text("22")
        deadline = time.monotonic() + 10
        while w.value != "22":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        w.stop()


def _files(tmp_path, ca, cas: list[bytes], **validity):
    cert, key = pki.server_files(tmp_path, ca, **validity)
    bundle = tmp_path / "client-ca.pem"
    bundle.write_bytes(b"".join(cas))
    return TLSConfig(cert, key, bundle)


def test_a_retired_client_ca_beside_its_successor_is_only_warned_about(tmp_path, caplog):
    """During a CA's rotation the bundle lists both; OpenSSL skips the expired one, so
    the server starts (and later renewals are taken). With no CA in its dates, it does not."""
    ca = pki.authority()
    retired = pki.authority("retired CA", valid_for=timedelta(days=-1))
    cfg = _files(tmp_path, ca, [pki.pem(retired[0]), pki.pem(ca[0])])
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.tls"):
        tls.read(cfg)
    assert "(certificate 1 of 2, CN=retired CA) expired on" in caplog.text
    only_retired = _files(tmp_path / "b", ca, [pki.pem(retired[0])])
    with pytest.raises(ServeError, match="no CA in it is within its dates"):
        tls.read(only_retired)


def test_a_renewal_not_valid_yet_is_taken_once_its_time_comes(tmp_path, caplog, monkeypatch):
    """The renewal starts 10 minutes from now (X.509 keeps whole seconds: a start seconds
    away left a second's margin); the clock the TLS checks read is then moved past it."""
    ca = pki.authority()
    cfg = _files(tmp_path, ca, [pki.pem(ca[0])], valid_for=timedelta(days=30))
    creds = tls.Credentials(cfg)
    first = creds.material
    pki.server_files(tmp_path, ca, valid_from=timedelta(minutes=10), valid_for=timedelta(days=90))
    with caplog.at_level(logging.ERROR, logger="quantgate.serve.watch"):
        assert not creds.check()
    assert "is not valid before" in caplog.text and creds.material is first
    ahead = timedelta(minutes=11)

    class Later(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + ahead

    monkeypatch.setattr(tls, "datetime", Later)  # its start of validity has come
    assert creds.check() and creds.material.expires > first.expires  # the same files
