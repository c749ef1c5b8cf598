"""A gRPC client that never reads its answers: HTTP/2 by hand (RFC 9113), announcing a
flow-control window of 0, so the server can send the headers of each answer but never its
message. What no gRPC library lets a client do, and what a hostile or stuck one does."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str) -> bytes:
    """An HPACK header "literal without indexing, new name", no Huffman (RFC 7541 6.2.2);
    names and values under 127 bytes, as every header here is."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


class Unread:
    """One connection to ``host:port``; ``call(path, message)`` starts a unary call whose
    answer is never read. The server's SETTINGS and PINGs are acknowledged on a thread, as
    a live client's are, and its GOAWAYs kept (``goaways``: each one's error code; ``goaway``
    set at the first). ``close()`` drops the connection, which ends every call."""

    def __init__(self, host: str, port: int):
        self._sock = socket.create_connection((host, port), timeout=10)
        self._next = 1
        self._lock = threading.Lock()
        self.goaway = threading.Event()
        self.goaways: list[int] = []
        settings = struct.pack(">HI", INITIAL_WINDOW_SIZE, 0)
        self._send(PREFACE + _frame(SETTINGS, 0, 0, settings))
        threading.Thread(target=self._read, daemon=True).start()

    def call(self, path: str, message: bytes) -> None:
        headers = b"".join(
            _literal(k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        with self._lock:
            stream, self._next = self._next, self._next + 2
            grpc_message = b"\x00" + struct.pack(">I", len(message)) + message
            self._sock.sendall(
                _frame(HEADERS, END_HEADERS, stream, headers)
                + _frame(DATA, END_STREAM, stream, grpc_message)
            )

    def _send(self, data: bytes) -> None:
        with self._lock:
            self._sock.sendall(data)

    def _read(self) -> None:
        buf = b""
        try:
            while chunk := self._sock.recv(65536):
                buf += chunk
                while len(buf) >= 9:
                    size = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + size:
                        break
                    kind, flags, payload = buf[3], buf[4], buf[9 : 9 + size]
                    buf = buf[9 + size :]
                    if kind == SETTINGS and not flags & ACK:
                        self._send(_frame(SETTINGS, ACK, 0))
                    elif kind == PING and not flags & ACK:
                        self._send(_frame(PING, ACK, 0, payload))
                    elif kind == GOAWAY:  # last stream id, error code, debug data
                        self.goaways.append(int.from_bytes(payload[4:8], "big"))
                        self.goaway.set()
        except OSError:
            pass  # closed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
