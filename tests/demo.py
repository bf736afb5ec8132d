"""Requests for the demo models, shared by the tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as triton


def simple_inputs(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> list[triton.InferInput]:
    """`INPUT0` and `INPUT1` of the `simple` model (INT32)."""
    inputs = []
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        tensor = triton.InferInput(name, list(data.shape), "INT32")
        tensor.set_data_from_numpy(data.astype(np.int32))
        inputs.append(tensor)
    return inputs


def infer_simple(client: triton.InferenceServerClient) -> None:
    """One `simple` request whose answer is checked."""
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    result = client.infer("simple", simple_inputs(data, data))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
