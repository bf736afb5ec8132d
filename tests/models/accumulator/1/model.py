"""Running sum per sequence (correlation id)."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            sequence = request.correlation_id()
            start = pb_utils.get_input_tensor_by_name(request, "START").as_numpy().flatten()[0]
            value = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy().flatten()[0]
            total = (0 if start else self.sums.get(sequence, 0)) + int(value)
            self.sums[sequence] = total
            output = pb_utils.Tensor("OUTPUT0", np.array([[total]], dtype=np.int32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
