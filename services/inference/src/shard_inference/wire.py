"""Reading the routing fields straight from a serialized KServe v2 request.

ModelInfer, ModelMetadata, ModelConfig and ModelReady requests all carry the model name in field
1 and the version in field 2. The router reads those two strings from the wire bytes and forwards
the bytes untouched: tensors are skipped over, never parsed or copied.
"""

from __future__ import annotations

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_NAME_FIELD, _VERSION_FIELD = 1, 2


class MalformedRequestError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise MalformedRequestError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def model_route(data: bytes) -> tuple[str, str]:
    """The (model name, model version) a request names; empty strings where it names none."""
    name = version = b""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise MalformedRequestError("truncated field")
            if field == _NAME_FIELD:
                name = data[pos : pos + length]
            elif field == _VERSION_FIELD:
                version = data[pos : pos + length]
            pos += length
        elif wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        else:
            raise MalformedRequestError(f"unsupported wire type {wire_type}")
    if pos != end:
        raise MalformedRequestError("truncated message")
    try:
        return name.decode(), version.decode()
    except UnicodeDecodeError as error:
        raise MalformedRequestError("model name or version is not UTF-8") from error


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def with_version(data: bytes, version: str) -> bytes:
    """The request with its version set to `version`. Protobuf keeps the last occurrence of a
    singular field, so appending the field overrides any earlier one without parsing the rest."""
    encoded = version.encode()
    return (
        data
        + bytes([_VERSION_FIELD << 3 | _LENGTH_DELIMITED])
        + _encode_varint(len(encoded))
        + encoded
    )
