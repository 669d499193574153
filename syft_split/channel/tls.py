"""TLS 1.3 material and framing of the direct data plane.

Everything cryptographic is the standard library's :mod:`ssl` (OpenSSL): TLS 1.3 only,
AES-GCM / ChaCha20-Poly1305. A channel's certificate is self-signed, made fresh per channel
with ``cryptography`` (ECDSA P-256, valid one day); it is never trusted because of who signed
it, only because the datasite handed it to the model owner through PySyft's authenticated call:
the client trusts exactly that certificate and checks its SHA-256 fingerprint.

Frames on a channel are length-prefixed: ``uint32 LE length | body``. Client bodies start with
one kind byte (:data:`HELLO`, :data:`REQUEST`, :data:`BYE`); a request body is
``kind | uint64 LE sequence number | wire bytes``. Server bodies are wire bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import ssl
import struct
import tempfile
import time

from ..errors import PayloadTooLargeError, TransportError

__all__ = [
    "HELLO",
    "REQUEST",
    "BYE",
    "make_certificate",
    "fingerprint",
    "server_context",
    "client_context",
    "send_frame",
    "recv_frame",
    "request_body",
    "parse_request",
    "peek",
]

HELLO, REQUEST, BYE = b"H", b"R", b"B"
_LEN = struct.Struct("<I")
_SEQ = struct.Struct("<Q")


def make_certificate(common_name: str = "syft-split-channel", days: int = 1
                     ) -> tuple[bytes, bytes, bytes]:
    """A fresh self-signed ECDSA P-256 certificate: (DER, PEM, private key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return (cert.public_bytes(serialization.Encoding.DER),
            cert.public_bytes(serialization.Encoding.PEM), key_pem)


def fingerprint(cert_der: bytes) -> bytes:
    """SHA-256 of a DER certificate (what the client pins)."""
    return hashlib.sha256(cert_der).digest()


def _tls13(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS 1.3 server context holding one certificate. ``ssl`` loads keys from files only:
    they are written to a private temporary directory (mode 0600) and removed at once."""
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with tempfile.TemporaryDirectory(prefix="syft-split-tls-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def client_context(cert_der: bytes) -> ssl.SSLContext:
    """A TLS 1.3 client context that trusts exactly ``cert_der`` (no CA, no host name: the
    certificate itself came through PySyft's authenticated call)."""
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=cert_der)
    except (ssl.SSLError, ValueError) as exc:
        raise TransportError(f"the channel certificate does not load: {exc}") from exc
    return ctx


def send_frame(sock: socket.socket, body: bytes) -> None:
    """Write one frame (length prefix + body)."""
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:  # a peer trickling bytes does not get more time
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("connection closed")
        got += k
    return buf


def recv_frame(sock: socket.socket, max_bytes: int, deadline: float | None = None) -> bytes:
    """Read one frame; :class:`EOFError` when the peer closed the connection cleanly. With
    ``deadline`` (a :func:`time.monotonic` time) the whole frame must arrive by then, else
    :class:`TimeoutError` (the socket's timeout is changed)."""
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size, deadline))
    if n > max_bytes:
        raise PayloadTooLargeError(f"frame of {n} bytes exceeds the limit of {max_bytes} bytes")
    return bytes(_recv_exact(sock, n, deadline))


def request_body(seq: int, data: bytes) -> bytes:
    """The body of request frame ``seq`` carrying wire bytes ``data``."""
    return REQUEST + _SEQ.pack(seq) + data


def parse_request(body: bytes) -> tuple[int, bytes]:
    """(sequence number, wire bytes) of a request body."""
    if len(body) < 1 + _SEQ.size or body[:1] != REQUEST:
        raise ValueError("not a request frame")
    (seq,) = _SEQ.unpack_from(body, 1)
    return seq, body[1 + _SEQ.size:]


def peek(data: bytes) -> tuple[str | None, str | None]:
    """(op, segment) of wire bytes, read from the header alone (no tensor is built); (None,
    None) when the bytes are not a wire message (the host's decoder then says why)."""
    from ..wire import MAGIC

    try:
        if data[:4] != MAGIC:
            return None, None
        (n,) = _LEN.unpack_from(data, 5)
        header = json.loads(data[9:9 + n])
        inline = header.get("inline", {})
        op, segment = inline.get("op"), inline.get("segment")
    except (ValueError, struct.error, AttributeError, TypeError, RecursionError):
        return None, None
    return (op if isinstance(op, str) else None,
            segment if isinstance(segment, str) else None)
