"""KServe v2 inference over HTTP, translated to and from the gRPC protocol the router speaks.

A request is JSON, optionally followed by Triton's binary tensor data extension: the
`Inference-Header-Content-Length` header gives the JSON's length, and each input whose parameters
carry `binary_data_size` takes that many bytes of what follows, in order. Tensors become
`raw_input_contents` (the layout Triton's binary extension already uses, strings included: a
4-byte little-endian length before each element), so binary inputs are passed on without a copy
into Python objects. Outputs come back as JSON arrays, or as binary data after the JSON when the
request asks for it (`binary_data` on an output, or `binary_data_output` for all).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from shard_core.errors import InvalidArgumentError

HEADER_LENGTH = "Inference-Header-Content-Length"
# numpy types of the KServe datatypes; BYTES is handled apart.
DTYPES: Mapping[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
# Parameters of the HTTP protocol only: they say how tensors travel, not what to compute.
HTTP_ONLY = {"binary_data_size", "binary_data", "binary_data_output"}


@dataclass(frozen=True, kw_only=True)
class ParsedRequest:
    request: service_pb2.ModelInferRequest
    binary_outputs: frozenset[str]  # outputs to send as binary data
    all_binary: bool  # every output as binary data (`binary_data_output`)


def _invalid(field: str, message: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{field} {message}", metadata={"field": field})


def _set_parameters(target: Any, parameters: Any, field: str) -> None:
    if not isinstance(parameters, dict):
        raise _invalid(field, "must be an object")
    for key, value in parameters.items():
        if key in HTTP_ONLY:
            continue
        parameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            raise _invalid(f"{field}.{key}", "must be a boolean, number or string")


def _element_count(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _serialize_bytes(elements: Sequence[Any], field: str) -> bytes:
    parts = []
    for element in elements:
        if isinstance(element, str):
            data = element.encode()
        elif isinstance(element, bytes):
            data = element
        else:
            raise _invalid(field, "must hold strings for a BYTES tensor")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _json_tensor(data: Any, datatype: str, shape: Sequence[int], field: str) -> bytes:
    """A JSON tensor's data (flat or nested, row-major) as raw bytes."""
    flat = np.asarray(data, dtype=object).reshape(-1) if datatype == "BYTES" else None
    if flat is not None:
        if flat.size != _element_count(shape):
            raise _invalid(field, f"has {flat.size} elements, the shape {list(shape)} needs more")
        return _serialize_bytes(list(flat), field)
    try:
        array = np.asarray(data, dtype=DTYPES[datatype])
    except (TypeError, ValueError, OverflowError) as error:
        raise _invalid(field, f"does not hold {datatype} values: {error}") from None
    if array.size != _element_count(shape):
        raise _invalid(
            field, f"has {array.size} elements where the shape {list(shape)} needs "
            f"{_element_count(shape)}"
        )  # fmt: skip
    return array.tobytes()


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary data after it."""
    length = len(body)
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise _invalid(HEADER_LENGTH, "must be an integer") from None
        if not 0 <= length <= len(body):
            raise _invalid(HEADER_LENGTH, f"must be between 0 and the body's {len(body)} bytes")
    try:
        document = json.loads(body[:length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _invalid("body", f"is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise _invalid("body", "must be a JSON object")
    return document, memoryview(body)[length:]


class _BinaryData:
    """The binary tensors after the JSON header, taken in order."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._offset = 0

    def take(self, size: Any, field: str) -> bytes:
        left = len(self._data) - self._offset
        if not isinstance(size, int) or not 0 <= size <= left:
            raise _invalid(field, f"must fit in the {left} binary bytes left")
        self._offset += size
        return bytes(self._data[self._offset - size : self._offset])

    def check_used(self) -> None:
        if self._offset != len(self._data):
            left = len(self._data) - self._offset
            raise _invalid("body", f"has {left} binary bytes no input claims")


def _add_input(
    request: service_pb2.ModelInferRequest, tensor: Any, field: str, binary: _BinaryData
) -> None:
    if not isinstance(tensor, dict):
        raise _invalid(field, "must be an object")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{field}.name", "is required")
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in DTYPES):
        raise _invalid(f"{field}.datatype", f"{datatype!r} is not a KServe v2 datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _invalid(f"{field}.shape", "must be a list of non-negative integers")
    parameters = tensor.get("parameters", {})
    entry = request.inputs.add(name=name, datatype=datatype, shape=shape)
    _set_parameters(entry.parameters, parameters, f"{field}.parameters")
    if "binary_data_size" in parameters:
        raw = binary.take(parameters["binary_data_size"], f"{field}.parameters.binary_data_size")
    elif "data" in tensor:
        raw = _json_tensor(tensor["data"], datatype, shape, f"{field}.data")
    else:
        raise _invalid(f"{field}.data", "is required without binary data")
    request.raw_input_contents.append(raw)


def _add_outputs(request: service_pb2.ModelInferRequest, outputs: Any) -> frozenset[str]:
    """Add the requested outputs; the names of those wanted as binary data."""
    if not isinstance(outputs, list):
        raise _invalid("outputs", "must be a list")
    binary = set()
    for index, output in enumerate(outputs):
        field = f"outputs[{index}]"
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise _invalid(f"{field}.name", "is required")
        parameters = output.get("parameters", {})
        entry = request.outputs.add(name=output["name"])
        _set_parameters(entry.parameters, parameters, f"{field}.parameters")
        if parameters.get("binary_data"):
            binary.add(output["name"])
    return frozenset(binary)


def parse_infer_request(
    body: bytes, header_length: str | None, model_name: str, model_version: str
) -> ParsedRequest:
    """The gRPC request for an HTTP inference request, and how its outputs should travel."""
    document, data = _split(body, header_length)
    request = service_pb2.ModelInferRequest(model_name=model_name, model_version=model_version)
    request.id = str(document.get("id", ""))
    parameters = document.get("parameters", {})
    _set_parameters(request.parameters, parameters, "parameters")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _invalid("inputs", "must be a non-empty list")
    binary = _BinaryData(data)
    for index, tensor in enumerate(inputs):
        _add_input(request, tensor, f"inputs[{index}]", binary)
    binary.check_used()
    return ParsedRequest(
        request=request,
        binary_outputs=_add_outputs(request, document.get("outputs", [])),
        all_binary=bool(parameters.get("binary_data_output")),
    )


def _parameter_value(parameter: service_pb2.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def _json_data(raw: bytes, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            element = raw[offset : offset + length]
            offset += length
            try:
                values.append(element.decode())
            except UnicodeDecodeError:
                values.append(element.decode("latin-1"))
        return values
    return np.frombuffer(raw, dtype=DTYPES[datatype]).tolist()  # type: ignore[no-any-return]


def render_infer_response(
    response: service_pb2.ModelInferResponse, parsed: ParsedRequest
) -> tuple[bytes, int | None]:
    """The HTTP body for a gRPC answer, and the JSON header's length when binary data
    follows it."""
    outputs, binary = [], []
    for index, tensor in enumerate(response.outputs):
        raw = (
            response.raw_output_contents[index]
            if index < len(response.raw_output_contents)
            else b""
        )
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        parameters = {key: _parameter_value(value) for key, value in tensor.parameters.items()}
        if parsed.all_binary or tensor.name in parsed.binary_outputs:
            parameters["binary_data_size"] = len(raw)
            binary.append(raw)
        else:
            entry["data"] = _json_data(raw, tensor.datatype)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = {
            key: _parameter_value(value) for key, value in response.parameters.items()
        }
    header = json.dumps(document, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return b"".join([header, *binary]), len(header)
