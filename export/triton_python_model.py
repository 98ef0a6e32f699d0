"""Triton Python-backend model: one ONNX model on ONNX Runtime (CPU).

Copied to `<repository>/<model>/1/model.py` by export/build_engines.py, next to `model.onnx`;
it imports the installed package (`pip install -e .`). All requests of one `execute()` call run as
merged batches; each request gets its own response, and its own error if it fails
(see export/python_backend.py): INVALID_ARG with what is allowed for a request outside the
export spec's shapes and value ranges (the `limits` parameter), INTERNAL otherwise.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # exists only inside Triton

from export.python_backend import (
    OnnxBatchModel,
    RequestError,
    instance_count,
    threads_for,
)


def _error(message: str, code: str):
    value = getattr(pb_utils.TritonError, code, None)  # older backends: message only
    return pb_utils.TritonError(message) if value is None else pb_utils.TritonError(message,
                                                                                      value)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        threads = threads_for(params.get("intra_op_threads"), instance_count(config))
        self.model = OnnxBatchModel(path, threads, json.loads(params.get("limits", "{}")))
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        arrays = [{t.name(): t.as_numpy() for t in r.inputs()} for r in requests]
        responses = []
        for result in self.model.run_requests(arrays):
            if isinstance(result, Exception):
                code = "INVALID_ARG" if isinstance(result, RequestError) else "INTERNAL"
                responses.append(pb_utils.InferenceResponse(output_tensors=[],
                                                            error=_error(str(result), code)))
            else:
                tensors = [pb_utils.Tensor(n, np.ascontiguousarray(result[n]))
                           for n in self.outputs]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
