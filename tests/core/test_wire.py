"""The router reads model name and version straight from the wire, as protobuf would."""

from __future__ import annotations

from typing import Any

import pytest
from tritonclient.grpc import service_pb2

from shard_inference.wire import (
    MalformedRequestError,
    model_route,
    sequence_id,
    with_id,
    without_id,
)


def _infer_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="simple", model_version="3", id="req-1")
    tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    tensor.parameters["p"].int64_param = -5
    request.parameters["priority"].uint64_param = 2**63
    request.raw_input_contents.append(b"\x80" * 4096)
    return request


@pytest.mark.parametrize(
    "message",
    [
        _infer_request(),
        service_pb2.ModelInferRequest(model_name="only-name"),
        service_pb2.ModelMetadataRequest(name="simple_string", version="1"),
        service_pb2.ModelConfigRequest(name="ünïcode-model"),
        service_pb2.ModelReadyRequest(name="m", version="12"),
    ],
)
def test_route_fields_match_protobuf(message: Any) -> None:
    data = message.SerializeToString()
    parsed = type(message).FromString(data)
    name = getattr(parsed, "model_name", None) or getattr(parsed, "name", "")
    version = getattr(parsed, "model_version", None) or getattr(parsed, "version", "")
    assert model_route(data) == (name, version)


def test_later_occurrence_wins_as_in_protobuf() -> None:
    data = (
        service_pb2.ModelInferRequest(model_name="first").SerializeToString()
        + service_pb2.ModelInferRequest(model_name="second").SerializeToString()
    )
    assert model_route(data) == ("second", "")
    assert service_pb2.ModelInferRequest.FromString(data).model_name == "second"


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05abc",  # length past the end
        b"\x0a",  # key without a length
        b"\x08\x80",  # truncated varint
        b"\x0b",  # group wire type
        b"\x0a\x02\xff\xfe",  # name that is not UTF-8
        b"\x09\x00",  # truncated fixed64
    ],
)
def test_malformed_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedRequestError):
        model_route(data)


def test_sequence_ids_are_read_from_the_parameters() -> None:
    numbered = _infer_request()
    numbered.parameters["sequence_id"].int64_param = 42
    numbered.parameters["sequence_start"].bool_param = True
    named = service_pb2.ModelInferRequest(model_name="m")
    named.parameters["sequence_id"].string_param = "abc"
    assert sequence_id(numbered.SerializeToString()) == "42"
    assert sequence_id(named.SerializeToString()) == "s:abc"
    assert sequence_id(_infer_request().SerializeToString()) == ""
    with pytest.raises(MalformedRequestError):
        sequence_id(b"\x22\x03\x0a\x05x")  # a parameters entry whose key overruns it


def test_the_id_comes_off_and_goes_back_on_without_touching_the_tensors() -> None:
    request = service_pb2.ModelInferRequest(model_name="m", model_version="1", id="req-7")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 4])
    request.raw_input_contents.append(bytes(range(16)))
    request.parameters["sequence_id"].int64_param = 9
    data = request.SerializeToString()

    shared, request_id = without_id(data)
    assert request_id == "req-7"
    stripped = service_pb2.ModelInferRequest.FromString(shared)
    assert stripped.id == ""
    request.ClearField("id")
    assert stripped == request
    other = service_pb2.ModelInferRequest()
    other.CopyFrom(request)
    other.id = "req-8"
    assert without_id(other.SerializeToString())[0] == shared  # identical but for the id

    answer = service_pb2.ModelInferResponse(model_name="m", id="req-7").SerializeToString()
    assert service_pb2.ModelInferResponse.FromString(with_id(answer, "req-9")).id == "req-9"
    assert service_pb2.ModelInferResponse.FromString(with_id(answer, "")).id == ""
