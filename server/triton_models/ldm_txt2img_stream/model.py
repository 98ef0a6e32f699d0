"""Triton Python-backend model `ldm_txt2img_stream` (decoupled): progress, then images.

Same inputs as `ldm_txt2img`. Sends one response per sampler step (`step`, `total` and a
low-resolution `preview`), then a final one with `images`, `warnings` and `used_seed`; over
gRPC streaming or HTTP `POST /v2/models/ldm_txt2img_stream/generate_stream` (server-sent
events). Each request runs in its own thread (at most `max_concurrent` at once), so one
instance serves several clients and their UNet calls meet: in this process's
`server.batching.CallBatcher` (networks: onnxruntime) or in `unet`'s dynamic batcher
(networks: bls). A cancelled request stops before its next UNet call.
"""
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton_python_backend_utils as pb_utils  # noqa: E402 - exists only inside Triton

from server import bls  # noqa: E402
from server.limits import parse_request  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.service, self.limits, options = bls.load_service(args)
        self.slots = threading.Semaphore(options.max_concurrent)
        self.threads: set[threading.Thread] = set()

    def execute(self, requests):
        for request in requests:
            thread = threading.Thread(target=self.run, args=(request,), daemon=True)
            self.threads.add(thread)
            thread.start()
        return None  # decoupled: responses go through each request's sender

    def run(self, request):
        sender = request.get_response_sender()
        try:
            req = parse_request(bls.read_inputs(request), self.limits)
            with self.slots:
                result = self.service.generate(
                    req,
                    on_progress=lambda p: sender.send(
                        pb_utils.InferenceResponse(bls.progress_tensors(p))),
                    is_cancelled=request.is_cancelled,
                )
            sender.send(pb_utils.InferenceResponse(bls.result_tensors(result)), flags=FINAL)
        except Exception as e:  # noqa: BLE001 - becomes this request's error
            sender.send(pb_utils.InferenceResponse(error=bls.error_for(e)), flags=FINAL)
        finally:
            self.threads.discard(threading.current_thread())

    def finalize(self):
        for thread in list(self.threads):
            thread.join(timeout=10)
