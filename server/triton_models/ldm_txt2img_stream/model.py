"""Triton Python-backend model `ldm_txt2img_stream` (decoupled): progress, then images.

The one model that holds the networks; `ldm_txt2img` passes its requests on to this one.
Sends one response per sampler step (`step`, `total` and a low-resolution `preview`), then a
final one with `images`, `warnings` and `used_seed`; over gRPC streaming or HTTP
`POST /v2/models/ldm_txt2img_stream/generate_stream` (server-sent events). Each request runs
in its own thread (at most `max_concurrent` at once), so one instance serves several clients
and their UNet calls meet: in this process's `server.batching.CallBatcher` (networks:
onnxruntime) or in `unet`'s dynamic batcher (networks: bls). A cancelled request stops
before its next UNet call.

Request parameters (optional): `progress: none` sends the final response only (what
`ldm_txt2img` asks for); `request_id: <id>` names a request so that a later request with
`cancel: <id>` (and any prompt) stops it; `health: true` is answered at once with an empty
final response (the launcher's liveness probe: a wedged stub does not answer).
"""
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton_python_backend_utils as pb_utils  # noqa: E402 - exists only inside Triton

from server import bls  # noqa: E402
from server.limits import parse_request  # noqa: E402

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
        self.slots = threading.Semaphore(options.max_concurrent)
        self.threads: set[threading.Thread] = set()
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
            thread = threading.Thread(target=self.run, args=(request, params), daemon=True)
            self.threads.add(thread)
            thread.start()
        return None  # decoupled: responses go through each request's sender

    def mark_cancelled(self, request_id: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.cancelled = {k: t for k, t in self.cancelled.items()
                              if now - t < CANCEL_MEMORY_S}
            self.cancelled[request_id] = now

    def run(self, request, params):
        sender = request.get_response_sender()
        request_id = str(params.get("request_id", ""))

        def is_cancelled() -> bool:
            return request.is_cancelled() or (bool(request_id) and request_id in self.cancelled)

        def on_progress(p) -> None:
            sender.send(pb_utils.InferenceResponse(bls.progress_tensors(p)))

        try:
            req = parse_request(bls.read_inputs(request), self.limits)
            with self.slots:
                result = self.service.generate(
                    req, on_progress=None if params.get("progress") == "none" else on_progress,
                    is_cancelled=is_cancelled)
            sender.send(pb_utils.InferenceResponse(bls.result_tensors(result)), flags=FINAL)
        except Exception as e:  # noqa: BLE001 - becomes this request's error
            sender.send(pb_utils.InferenceResponse(error=bls.error_for(e)), flags=FINAL)
        finally:
            self.threads.discard(threading.current_thread())
            with self.lock:
                self.cancelled.pop(request_id, None)

    def finalize(self):
        for thread in list(self.threads):
            thread.join(timeout=10)
