"""Triton Python-backend model `<name>_txt2img_stream` (`ldm_txt2img_stream` for the default
name; decoupled): progress, then images.

The one model that holds the networks; `ldm_txt2img` passes its requests on to this one.
Sends one response per sampler step (`step`, `total` and a low-resolution `preview`), then a
final one with `images`, `warnings` and `used_seed`; over gRPC streaming or HTTP
`POST /v2/models/ldm_txt2img_stream/generate_stream` (server-sent events). Each request runs
on a `server.concurrency.RequestPool` thread (at most `max_concurrent` at once; the rest
wait their turn), so one instance serves several clients
and their UNet calls meet: in this process's `server.batching.CallBatcher` (networks:
onnxruntime) or in `unet`'s dynamic batcher (networks: bls). A cancelled request stops
before its next UNet call.

Request parameters (optional): `progress: none` sends the final response only (what
`ldm_txt2img` asks for); `request_id: <id>` names a request so that a later request with
`cancel: <id>` (and any prompt) stops it; `health: true` is answered at once with an empty
final response (the launcher's liveness probe: a wedged stub does not answer).
"""
import json
import threading
import time

import triton_python_backend_utils as pb_utils  # exists only inside Triton

# The installed package (pip install -e .).
from server import bls
from server.concurrency import RequestPool
from server.contract import GenerationRequest

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_MEMORY_S = 600.0  # a cancel that arrives before its request is kept this long


def request_parameters(request) -> dict:
    try:
        return json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        return {}


class TritonPythonModel:
    def initialize(self, args):
        self.service, self.limits, options = bls.load_service(args)
        self.pool = RequestPool(options.max_concurrent, args["model_name"])
        self.cancelled: dict[str, float] = {}  # request_id -> when the cancel came
        self.lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            params = request_parameters(request)
            if "cancel" in params or params.get("health"):
                if "cancel" in params:
                    self.mark_cancelled(str(params["cancel"]))
                request.get_response_sender().send(flags=FINAL)
                continue
            try:  # validated here, at once: a bad request does not wait for a slot
                req = GenerationRequest.from_inputs(bls.read_inputs(request)).resolve(
                    self.limits)
            except Exception as e:  # noqa: BLE001 - becomes this request's error
                self.answer_error(request, e)
                continue
            self.pool.submit(self.run, self.reject, request, req, params)
        return None  # decoupled: responses go through each request's sender

    def mark_cancelled(self, request_id: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.cancelled = {k: t for k, t in self.cancelled.items()
                              if now - t < CANCEL_MEMORY_S}
            self.cancelled[request_id] = now

    def answer_error(self, request, exc):
        request.get_response_sender().send(pb_utils.InferenceResponse(error=bls.error_for(exc)),
                                           flags=FINAL)

    def reject(self, request, req, params):
        self.answer_error(request, bls.Unavailable("the model is being unloaded"))

    def run(self, request, req, params):
        sender = request.get_response_sender()
        request_id = str(params.get("request_id", ""))

        def is_cancelled() -> bool:
            return request.is_cancelled() or (bool(request_id) and request_id in self.cancelled)

        def on_progress(p) -> None:
            sender.send(pb_utils.InferenceResponse(bls.progress_tensors(p)))

        try:
            result = self.service.generate(
                req, on_progress=None if params.get("progress") == "none" else on_progress,
                is_cancelled=is_cancelled)
            sender.send(pb_utils.InferenceResponse(bls.result_tensors(result)), flags=FINAL)
        except Exception as e:  # noqa: BLE001 - becomes this request's error
            sender.send(pb_utils.InferenceResponse(error=bls.error_for(e)), flags=FINAL)
        finally:
            with self.lock:
                self.cancelled.pop(request_id, None)

    def finalize(self):
        self.pool.shutdown()
