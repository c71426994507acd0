"""Direct TLS: the server's SSLContext, and a certificate that is renewed in place.

uvicorn listens with one `ssl.SSLContext` for the whole life of the process. A
renewal (certbot, acme.sh) must reach new connections without a restart, which
would drop every live stream. So the listening context carries an
`sni_callback` that hands each new handshake the context last loaded from the
files: connections already open keep the session they negotiated, the next
handshake gets the new certificate.

`CertReloader.check()` stats the two files and, when either changed, loads and
validates the pair (it parses, the key matches the certificate, it has not
expired) before swapping it in. A pair that fails keeps the previous context,
logs one line naming the file and the reason, and is counted on /metrics. It
is a plain callable: a periodic task runs it, and a reload signal may as well.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LOG = logging.getLogger("relay.tls")


class CertificateError(ValueError):
    """A certificate/key pair that cannot be served. The message names the file."""


@dataclass(frozen=True)
class Certificate:
    """What an operator wants to know about the certificate being served."""

    subject: str  # the subject's common name, or the whole subject when it has none
    not_after: float  # Unix time
    names: tuple[str, ...]  # subjectAltName DNS names and IP addresses

    def describe(self) -> str:
        expires = datetime.datetime.fromtimestamp(self.not_after, datetime.UTC)
        return f"{self.subject}, expires {expires:%Y-%m-%d %H:%M} UTC"


def server_context() -> ssl.SSLContext:
    """The standard library's secure server defaults, TLS 1.2 at the least."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = max(context.minimum_version, ssl.TLSVersion.TLSv1_2)
    # No renegotiation (a client-triggered CPU cost with no use here).
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CertificateError(f"{what} {path}: cannot read: {exc.strerror}") from None


def _parse(cert_pem: bytes, key_pem: bytes, cert_path: str, key_path: str) -> Certificate:
    """Parse the certificate (the first of the chain) and the key; check that they match."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CertificateError(f"certificate {cert_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertificateError(
            f"key {key_path}: encrypted with a passphrase (the relay needs it unencrypted)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"key {key_path}: not a PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CertificateError(f"key {key_path}: does not match the certificate {cert_path}")
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(common[0].value) if common else cert.subject.rfc4514_string() or "(no subject)"
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        names += san.get_values_for_type(x509.DNSName)
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return Certificate(subject, cert.not_valid_after_utc.timestamp(), tuple(names))


def load_pair(cert_path: str, key_path: str) -> tuple[ssl.SSLContext, Certificate]:
    """A server context serving this pair, and what it serves; CertificateError if unusable.

    The files are read once and the context is built from those bytes, so a pair
    half-replaced while this runs is refused or loaded whole, never served in part.
    """
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "key")
    info = _parse(cert_pem, key_pem, cert_path, key_path)
    if info.not_after <= time.time():
        expired = datetime.datetime.fromtimestamp(info.not_after, datetime.UTC)
        raise CertificateError(f"certificate {cert_path}: expired on {expired:%Y-%m-%d %H:%M} UTC")
    context = server_context()
    try:
        _load_chain_from_bytes(context, cert_pem, key_pem)
    except ssl.SSLError as exc:  # the key and first certificate parsed: the rest of the chain
        reason = exc.reason or "a certificate after the first is damaged"
        raise CertificateError(
            f"certificate {cert_path}: chain cannot be loaded ({reason})"
        ) from None
    except _EncryptedKey:  # parsed as unencrypted above; OpenSSL thinks otherwise
        raise CertificateError(f"key {key_path}: encrypted with a passphrase") from None
    except OSError as exc:  # no descriptor for the in-memory copies (EMFILE, …)
        raise CertificateError(f"certificate {cert_path}: cannot load: {exc.strerror}") from None
    return context, info


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, and a reload would hang.
    raise _EncryptedKey


def _load_chain_from_bytes(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` on bytes: through anonymous in-memory files (Linux memfd),
    else private temporary files."""
    if hasattr(os, "memfd_create"):
        cert_fd = os.memfd_create("hive-relay-cert")
        key_fd = os.memfd_create("hive-relay-key")
        try:
            os.write(cert_fd, cert_pem)
            os.write(key_fd, key_pem)
            context.load_cert_chain(
                f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}", password=_no_password
            )
        finally:
            os.close(cert_fd)
            os.close(key_fd)
        return
    import tempfile  # pragma: no cover - non-Linux

    with tempfile.TemporaryDirectory() as tmp:  # pragma: no cover - non-Linux
        cert_file = os.path.join(tmp, "cert.pem")
        key_file = os.path.join(tmp, "key.pem")
        for path, data in ((cert_file, cert_pem), (key_file, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(cert_file, key_file, password=_no_password)


def _stamp(path: str) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or a symlink (certbot's live/) is repointed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class CertReloader:
    """The listening context (`context`) and the certificate it currently serves.

    Raises CertificateError at construction when the pair cannot be served.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self._lock = threading.Lock()
        self._stamps = (_stamp(cert_path), _stamp(key_path))
        self._failed: tuple[object, object] | None = None  # stamps that failed once
        self._current, self.certificate = load_pair(cert_path, key_path)
        self.reloads = {"ok": 0, "failed": 0}
        self.last_error = ""
        # The listening context: its own defaults apply to every handshake (the
        # protocol floor is read from it), its certificate only until the
        # callback, which runs for every ClientHello (SNI or not), swaps in the
        # context holding the newest good pair.
        self.context, _ = load_pair(cert_path, key_path)
        self.context.sni_callback = self._select

    def _select(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        conn.context = self._current

    def check(self) -> bool:
        """Reload the pair if either file changed; True when a new pair is now served.

        A change that fails to load (unreadable, half-written, key mismatch,
        expired) keeps the pair being served. It is tried once more at the next
        check, since a renewal that writes the two files one after the other is
        caught between them now and then; if the files are still the same and
        still fail, that is reported once (log line, /metrics) and not again
        until either file changes.
        """
        with self._lock:
            stamps = (_stamp(self.cert_path), _stamp(self.key_path))
            if stamps == self._stamps:
                return False
            try:
                context, info = load_pair(self.cert_path, self.key_path)
            except CertificateError as exc:
                if stamps != self._failed:
                    self._failed = stamps  # maybe mid-renewal: look again next time
                    return False
                self._stamps = stamps
                self.reloads["failed"] += 1
                self.last_error = str(exc)
                LOG.error("TLS reload failed, still serving %s: %s", self.certificate.subject, exc)
                return False
            self._stamps = stamps
            self._current = context
            self.certificate = info
            self.reloads["ok"] += 1
            self.last_error = ""
            LOG.info("TLS certificate reloaded: %s", info.describe())
            return True

    def collect(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "hive_relay_tls_reload",
            "Certificate reloads after the files changed, by result (ok, failed: old pair kept)",
            labels=["result"],
        )
        for result, n in sorted(self.reloads.items()):
            reloads.add_metric([result], n)
        yield reloads
        yield GaugeMetricFamily(
            "hive_relay_tls_cert_not_after_seconds",
            "Expiry (Unix time) of the TLS certificate being served",
            value=self.certificate.not_after,
        )
