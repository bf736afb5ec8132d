"""gRPC requests byte by byte, for sending Envoy what no gRPC client would: hostile bodies that
the gates and the edge must read exactly as Triton would, or refuse."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence

import h2.connection
import h2.events

INFER = "/inference.GRPCInferenceService/ModelInfer"


def field(number: int, value: bytes) -> bytes:
    """A short length-delimited protobuf field."""
    return bytes([number << 3 | 2, len(value)]) + value


def frame(message: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC message frame (its length may lie)."""
    size = len(message) if length is None else length
    return bytes([1 if compressed else 0]) + size.to_bytes(4, "big") + message


def malformed(model: bytes, other: bytes) -> dict[str, bytes]:
    """ModelInfer bodies no reader may take as naming `model` (and never as `other`): each
    must be refused, or read as Triton's C++ protobuf would."""
    named, second = field(1, model), field(1, other)
    cases = {
        "compressed": frame(named, compressed=True),
        "truncated frame": frame(named, length=len(named) + 5),
        "two frames": frame(named) + frame(named),
        "short header": b"\x00\x00",
        "empty": b"",
        "no model name": frame(field(3, b"id")),
        "empty model name": frame(field(1, b"")),
        "huge varint": frame(b"\x0a" + b"\xff" * 11),
        "length past the end": frame(b"\x0a\x7f" + model),
        "model name as a varint": frame(b"\x08\x01"),
        "a group": frame(b"\x0b"),
        "field zero": frame(b"\x02\x00" + named),
        # C++ protobuf (Triton's) reads a tag as 32 bits of at most five bytes: a longer or
        # wider one would be field 1 there and another field here.
        "tag past 32 bits": frame(named + b"\x8a\x80\x80\x80\x10" + second[1:]),
        "tag past five bytes": frame(named + b"\x8a\x80\x80\x80\x80\x00" + second[1:]),
        "length past 31 bits": frame(b"\x0a\x86\x80\x80\x80\x08" + model),
    }
    for fifth in range(0x10, 0x80, 0x0B):
        tag = b"\x8a\x80\x80\x80" + bytes([fifth])
        cases[f"tag with fifth byte {fifth:#x}"] = frame(named + tag + second[1:])
    return cases


def h2_post(
    port: int,
    body: bytes,
    *,
    context: ssl.SSLContext | None = None,
    hostname: str = "localhost",
    path: str = INFER,
    headers: Sequence[tuple[str, str]] = (),
) -> tuple[str, str]:
    """POST `body` as the whole gRPC request body (over TLS with `context`, else plaintext
    HTTP/2); the grpc-status and grpc-message of the answer."""
    request = [
        (":method", "POST"),
        (":path", path),
        (":scheme", "https" if context else "http"),
        (":authority", hostname),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *headers,
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        sock = context.wrap_socket(raw, server_hostname=hostname) if context else raw
        connection = h2.connection.H2Connection()
        connection.initiate_connection()
        connection.send_headers(1, request)
        connection.send_data(1, body, end_stream=True)
        sock.sendall(connection.data_to_send())
        answer: dict[str, str] = {}
        while True:
            data = sock.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    answer |= {k.decode(): v.decode() for k, v in event.headers}
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return answer.get("grpc-status", ""), answer.get("grpc-message", "")
            sock.sendall(connection.data_to_send())
    return "", "connection closed"
