"""relay/tls.py's CertReloader on its own: when a check reloads, refuses, or reports.

The served certificate over real connections is tests/test_tls.py's; these are the
rules of `check()` that a poll or a reload signal relies on.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from relay.tls import CertificateError, CertReloader, load_pair
from tests.certs import TestCA


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def _pair(ca: TestCA, tmp_path: Path, cn: str = "first") -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.issue(cn).write(cert, key)
    return cert, key


def test_unchanged_files_reload_nothing(ca: TestCA, tmp_path: Path) -> None:
    cert, key = _pair(ca, tmp_path)
    tls = CertReloader(str(cert), str(key))
    assert tls.certificate.subject == "first"
    assert tls.certificate.names == ("localhost", "127.0.0.1")
    assert [tls.check() for _ in range(3)] == [False, False, False]
    assert tls.reloads == {"ok": 0, "failed": 0}


def test_a_pair_caught_mid_renewal_is_retried_before_it_is_reported(
    ca: TestCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = _pair(ca, tmp_path)
    tls = CertReloader(str(cert), str(key))
    renewed = ca.issue("second")
    key.write_bytes(renewed.key_pem)  # the key is new, the certificate not yet
    with caplog.at_level(logging.INFO, "relay.tls"):
        assert tls.check() is False
        assert tls.reloads == {"ok": 0, "failed": 0}  # not reported yet
        cert.write_bytes(renewed.cert_pem)
        assert tls.check() is True
    assert tls.certificate.subject == "second"
    assert tls.reloads == {"ok": 1, "failed": 0}
    assert [r.message for r in caplog.records] == [
        "TLS certificate reloaded: " + tls.certificate.describe()
    ]


def test_a_pair_that_stays_bad_is_reported_once_until_it_changes(
    ca: TestCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = _pair(ca, tmp_path)
    tls = CertReloader(str(cert), str(key))
    served = tls.context
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ncut sh")
    with caplog.at_level(logging.INFO, "relay.tls"):
        results = [tls.check() for _ in range(5)]
    assert results == [False] * 5
    assert tls.reloads == {"ok": 0, "failed": 1}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage() == (
        f"TLS reload failed, still serving first: certificate {cert}: not a PEM certificate"
    )
    assert tls.context is served and tls.certificate.subject == "first"
    ca.issue("fixed").write(cert, key)
    assert tls.check() is True
    assert tls.certificate.subject == "fixed" and tls.last_error == ""


def test_a_damaged_chain_after_the_leaf_is_refused(ca: TestCA, tmp_path: Path) -> None:
    cert, key = _pair(ca, tmp_path)
    leaf = cert.read_bytes()
    cert.write_bytes(leaf + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError, match="chain cannot be loaded"):
        load_pair(str(cert), str(key))
    cert.write_bytes(leaf + ca.cert_pem)  # leaf then issuer: a real chain loads
    load_pair(str(cert), str(key))


def test_no_descriptor_left_is_a_refusal_not_a_crash(
    ca: TestCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _pair(ca, tmp_path)
    tls = CertReloader(str(cert), str(key))
    ca.issue("second").write(cert, key)

    def exhausted(name: str, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "memfd_create", exhausted)
    assert [tls.check(), tls.check()] == [False, False]
    assert tls.reloads["failed"] == 1
    assert tls.last_error == f"certificate {cert}: cannot load: Too many open files"
    monkeypatch.undo()
    ca.issue("third").write(cert, key)
    assert tls.check() is True
