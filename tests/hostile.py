"""A hostile HTTP server on loopback: answers whatever a test scripts, byte for byte.

Unlike the emulator, which behaves like HubSpot, this server misbehaves on purpose: redirects,
dripping answers, lies about results, HTML error pages, echoed credentials, TLS where plain HTTP is
expected. Each request is parsed and recorded (``seen``); the test's handler returns a
:class:`Reply`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    """What to send back. ``body`` may be bytes, text, or anything JSON-able."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    drip_s: float = 0.0  # pause between single bytes of the whole answer, status line included
    chunked: bool = False  # no Content-Length: the body is sent chunked
    close: bool = False

    def encode(self) -> bytes:
        if isinstance(self.body, bytes):
            body = self.body
        elif isinstance(self.body, str):
            body = self.body.encode()
        else:
            body = json.dumps(self.body).encode()
        lines = [f"HTTP/1.1 {self.status} X", f"Content-Type: {self.content_type}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
            size = 4096
            payload = b"".join(
                f"{len(body[i:i + size]):x}\r\n".encode() + body[i:i + size] + b"\r\n"
                for i in range(0, len(body), size)
            ) + b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(body)}")
            payload = body
        if self.close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files in ``folder``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


class HostileServer:
    """A threaded loopback server whose every answer comes from ``handler(seen) -> Reply``.

    :param tls: ``(cert, key)`` PEM paths to speak HTTPS.
    """

    def __init__(self, handler: Callable[[Seen], Reply], *, tls: tuple[Path, Path] | None = None) -> None:
        self.handler = handler
        self.seen: list[Seen] = []
        self.connections = 0
        self._tls = None
        if tls is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(str(tls[0]), str(tls[1]))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(32)
        self._sock.settimeout(0.1)  # so the accept loop notices a stop at once
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def connection(self, token: str | None = "pat-hostile-token", **extra: Any) -> str:
        """JSON for an ``AIRFLOW_CONN_...`` variable pointing a ``hubspot`` connection here."""
        return json.dumps({"conn_type": "hubspot", "host": self.url, "password": token, "extra": extra})

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._sock.close()
        with self._lock:
            for conn in list(self._open):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # ------------------------------------------------------------------ serving

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._open.add(conn)
        try:
            if self._tls is not None:
                try:
                    conn = self._tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    return
            conn.settimeout(30)
            buffer = b""
            while not self._stopping.is_set():
                while b"\r\n\r\n" not in buffer:
                    if buffer[:1] == b"\x16":  # a TLS ClientHello sent to a plain-HTTP server
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                        return
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                parts = urlsplit(target)
                seen = Seen(method, parts.path, parse_qs(parts.query), headers, body)
                self.seen.append(seen)
                reply = self.handler(seen)
                payload = reply.encode()
                if reply.drip_s:
                    for i in range(len(payload)):
                        if self._stopping.is_set():
                            return
                        conn.sendall(payload[i:i + 1])
                        time.sleep(reply.drip_s)
                else:
                    conn.sendall(payload)
                if reply.close:
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(conn)
            try:
                conn.close()
            except OSError:
                pass


def batch_answer(seen: Seen, *, state: str | None = None, status: str = "COMPLETE", extra_results: list | None = None,
                 results: list | None = None) -> dict[str, Any]:
    """A well-formed batch-write answer confirming each input of ``seen`` (``state`` overrides its status)."""
    if results is None:
        results = [
            {"subscriberIdString": item["subscriberIdString"].lower(), "subscriptionId": item["subscriptionId"],
             "channel": "EMAIL", "status": state or item["statusState"], "source": "PUBLIC_STATUS_API",
             "timestamp": "2026-11-26T00:00:00.000Z", "setStatusSuccessReason": "REQUESTED_CHANGE_OCCURRED"}
            for item in seen.json()["inputs"]
        ]
    return {"status": status, "results": results + (extra_results or []),
            "startedAt": "2026-11-26T00:00:00.000Z", "completedAt": "2026-11-26T00:00:00.100Z"}
