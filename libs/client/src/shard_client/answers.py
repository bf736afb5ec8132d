"""Comparing inference answers: a node's against a known answer (canaries), or two nodes'
answers to the same request (redundancy sampling)."""

from __future__ import annotations

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2


def mismatch(
    expected: service_pb2.ModelInferResponse, actual: service_pb2.ModelInferResponse
) -> str:
    """What differs between the expected answer's outputs and the actual one's, or an empty
    string. Outputs the expected answer does not name are not compared."""
    got = {
        output.name: (output, actual.raw_output_contents[index])
        for index, output in enumerate(actual.outputs)
        if index < len(actual.raw_output_contents)
    }
    for index, output in enumerate(expected.outputs):
        if output.name not in got:
            return f"output {output.name} is missing"
        tensor, contents = got[output.name]
        if tensor.datatype != output.datatype or list(tensor.shape) != list(output.shape):
            return f"output {output.name} is {tensor.datatype}{list(tensor.shape)}"
        expected_contents = (
            expected.raw_output_contents[index]
            if index < len(expected.raw_output_contents)
            else b""
        )
        if contents != expected_contents:
            return f"output {output.name} has other values"
    return ""


def disagreement(first: bytes, second: bytes) -> str:
    """What differs between two serialized answers to one request (both ways), or an empty
    string when they agree; an answer that is not a ModelInferResponse disagrees."""
    try:
        one = service_pb2.ModelInferResponse.FromString(first)
        other = service_pb2.ModelInferResponse.FromString(second)
    except DecodeError:
        return "an answer is not a ModelInferResponse"
    return mismatch(one, other) or mismatch(other, one)
