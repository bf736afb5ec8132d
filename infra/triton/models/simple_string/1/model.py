"""Triton's example `simple_string` model: sum and difference of decimal strings."""

import numpy as np
import triton_python_backend_utils as pb_utils


def _as_ints(tensor):
    return np.vectorize(lambda item: int(item.decode() if isinstance(item, bytes) else item))(
        tensor.as_numpy()
    ).astype(np.int64)


def _as_strings(values):
    return np.vectorize(lambda value: str(value).encode(), otypes=[object])(values)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                in0 = _as_ints(pb_utils.get_input_tensor_by_name(request, "INPUT0"))
                in1 = _as_ints(pb_utils.get_input_tensor_by_name(request, "INPUT1"))
            except ValueError as error:
                message = f"INPUT0 and INPUT1 must hold decimal integers: {error}"
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
                    )
                )
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUTPUT0", _as_strings(in0 + in1)),
                        pb_utils.Tensor("OUTPUT1", _as_strings(in0 - in1)),
                    ]
                )
            )
        return responses
