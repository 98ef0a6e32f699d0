"""Triton Python-backend model `ldm_txt2img`: one prompt in, N uint8 images out.

Copied to `<repository>/ldm_txt2img/1/model.py` by `server.repository.write_pipeline_models`,
beside copies of the modules it imports, the tokenizer and the schedule (server/txt2img.py
runs the loop).

`execute` does not wait for the images: it hands each request to a pool of `max_concurrent`
threads and returns, and each thread answers through the request's response sender (one
response, flagged final; the Python backend allows this for non-decoupled models). So the
instance takes new requests while others are mid-loop, and their UNet steps meet: merged in
this process by `server.batching.CallBatcher` (networks: onnxruntime), or in the `unet`
model's dynamic batcher (networks: bls). A request that finds every thread busy waits in the
pool's queue. A bad value fails only its own request, with an INVALID_ARG error that says
what is allowed.
"""
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The modules copied beside this file win over any other copy on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton_python_backend_utils as pb_utils  # noqa: E402 - exists only inside Triton

from server import bls  # noqa: E402
from server.limits import parse_request  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.service, self.limits, options = bls.load_service(args)
        self.pool = ThreadPoolExecutor(options.max_concurrent, thread_name_prefix="ldm_txt2img")
        self.closing = False

    def execute(self, requests):
        for request in requests:
            # Copied now: the thread may run after execute() has returned.
            inputs = {name: a.copy() for name, a in bls.read_inputs(request).items()}
            self.pool.submit(self.run, request, inputs)
        return None  # each response goes through its request's sender

    def run(self, request, inputs):
        sender = request.get_response_sender()
        try:
            if self.closing:
                raise bls.Unavailable("the model is being unloaded")
            req = parse_request(inputs, self.limits)
            result = self.service.generate(req, is_cancelled=request.is_cancelled)
            response = pb_utils.InferenceResponse(bls.result_tensors(result))
        except Exception as e:  # noqa: BLE001 - becomes this request's error
            response = pb_utils.InferenceResponse(error=bls.error_for(e))
        sender.send(response, flags=FINAL)

    def finalize(self):
        self.closing = True  # queued requests get an error instead of a late image
        self.pool.shutdown(wait=True)
