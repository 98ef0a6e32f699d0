"""Triton Python-backend BLS model `ldm_txt2img`: one prompt in, N uint8 images out.

Copied to `<repository>/ldm_txt2img/1/model.py` by `server.repository.write_pipeline_models`,
beside copies of the `ldm`/`server` modules it imports, the tokenizer and the schedule. Calls
`text_encoder`, `unet` (once per sampler step, guided and unguided halves in one batch) and
`vae_decoder` through BLS (server/txt2img.py). Each request gets its own response; a bad value
fails only its own request, with an INVALID_ARG error that says what is allowed.
"""
import sys
from pathlib import Path

# The modules copied beside this file win over any other copy on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton_python_backend_utils as pb_utils  # noqa: E402 - exists only inside Triton

from server import bls  # noqa: E402
from server.limits import parse_request  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.service, self.limits, _ = bls.load_service(args)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                req = parse_request(bls.read_inputs(request), self.limits)
                result = self.service.generate(req, is_cancelled=request.is_cancelled)
                responses.append(pb_utils.InferenceResponse(bls.result_tensors(result)))
            except Exception as e:  # noqa: BLE001 - becomes this request's error
                responses.append(pb_utils.InferenceResponse(error=bls.error_for(e)))
        return responses
