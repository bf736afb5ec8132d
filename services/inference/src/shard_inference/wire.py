"""Reading the routing fields straight from a serialized KServe v2 request.

ModelInfer, ModelMetadata, ModelConfig and ModelReady requests all carry the model name in field
1 and the version in field 2. The router reads those two strings from the wire bytes and forwards
the bytes untouched: tensors are skipped over, never parsed or copied.
"""

from __future__ import annotations

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_NAME_FIELD, _VERSION_FIELD, _ID_FIELD, _PARAMETERS_FIELD = 1, 2, 3, 4
_SEQUENCE_ID = b"sequence_id"
# InferParameter: int64_param = 2, string_param = 3, uint64_param = 5.
_INT64_PARAM, _STRING_PARAM, _UINT64_PARAM = 2, 3, 5


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


def _fields(data: bytes) -> list[tuple[int, int, int, int]]:
    """(field, wire type, start, end) of each field of a message; for varints, the value is
    read from data[start:end]."""
    found = []
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire_type = key >> 3, key & 7
        start = pos
        if wire_type == _LENGTH_DELIMITED:
            length, start = _varint(data, pos)
            pos = start + length
            if pos > end:
                raise MalformedRequestError("truncated field")
        elif wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        else:
            raise MalformedRequestError(f"unsupported wire type {wire_type}")
        found.append((field, wire_type, start, pos))
    if pos != end:
        raise MalformedRequestError("truncated message")
    return found


def sequence_id(data: bytes) -> str:
    """The `sequence_id` parameter of a ModelInferRequest, as text; empty when it has none.
    Only the parameters are decoded: tensors are skipped as in `model_route`."""
    found = ""
    for field, wire_type, start, end in _fields(data):
        if field != _PARAMETERS_FIELD or wire_type != _LENGTH_DELIMITED:
            continue
        entry = data[start:end]
        key, value = b"", b""
        for entry_field, _, entry_start, entry_end in _fields(entry):
            if entry_field == 1:
                key = entry[entry_start:entry_end]
            elif entry_field == 2:
                value = entry[entry_start:entry_end]
        if key != _SEQUENCE_ID:
            continue
        for param_field, param_type, param_start, param_end in _fields(value):
            if param_field in (_INT64_PARAM, _UINT64_PARAM) and param_type == _VARINT:
                found = str(_varint(value, param_start)[0])
            elif param_field == _STRING_PARAM and param_type == _LENGTH_DELIMITED:
                found = "s:" + value[param_start:param_end].decode(errors="replace")
    return found


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


def _with_string(data: bytes, field: int, value: str) -> bytes:
    """`data` with the string `field` set to `value`. Protobuf keeps the last occurrence of a
    singular field, so appending the field overrides any earlier one without parsing the rest."""
    encoded = value.encode()
    return data + bytes([field << 3 | _LENGTH_DELIMITED]) + _encode_varint(len(encoded)) + encoded


def with_version(data: bytes, version: str) -> bytes:
    """The request with its version set to `version`."""
    return _with_string(data, _VERSION_FIELD, version)


def with_id(data: bytes, request_id: str) -> bytes:
    """A ModelInferRequest or ModelInferResponse with its `id` (field 3 of both) set."""
    return _with_string(data, _ID_FIELD, request_id)


def without_id(data: bytes) -> tuple[bytes, str]:
    """A ModelInferRequest without its `id` (what identical requests share), and the id.
    Fields lie back to back, so each one runs from where the previous one ended."""
    parts, request_id, pos = [], "", 0
    for field, wire_type, start, end in _fields(data):
        if field == _ID_FIELD and wire_type == _LENGTH_DELIMITED:
            request_id = data[start:end].decode(errors="replace")
        else:
            parts.append(data[pos:end])
        pos = end
    return b"".join(parts), request_id
