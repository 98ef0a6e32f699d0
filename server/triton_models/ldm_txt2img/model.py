"""Triton Python-backend model `<name>_txt2img` (`ldm_txt2img` for the default name): one
prompt in, N uint8 images out.

A thin front for `ldm_txt2img_stream`, the model that holds the networks: each request goes
on to it through BLS (decoupled) with the request parameter `progress: none`, and its final
response comes back as this model's one response (errors keep their status: a bad value is
still INVALID_ARG). So the text encoder, UNet and VAE decoder are resident once for both
endpoints (a 1.45 B model is 6 GB of weights), and plain and streaming requests' UNet steps
meet in one batcher. This process imports no torch and stays small.

Cancellation: the BLS of Triton 2.51 cannot cancel a request it sent, so a watcher thread
polls the requests in flight, and when a client cancels one it sends `ldm_txt2img_stream` a
second request with the parameter `cancel: <id>`; that stops the first one before its next
UNet call, and the client gets its CANCELLED error.

`execute` returns at once; a `server.concurrency.RequestPool` of threads waits on the BLS
responses and answers through each request's response sender (allowed for non-decoupled
models). Each request is validated here, at this model's edge (a BLS error from the target
comes back without its status), and passed on resolved: every field set, the seed drawn.
"""
import json
import threading
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils  # exists only inside Triton

# The installed package (pip install -e .); no torch here.
from server.concurrency import RequestPool
from server.contract import OUTPUTS as OUTPUT_SPECS
from server.contract import (
    GenerationRequest,
    InvalidRequest,
    Limits,
    ServingOptions,
    config_parameters,
    pipeline_names,
    served_name,
)

OUTPUTS = list(OUTPUT_SPECS)
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _error(message, code=None):
    value = getattr(pb_utils.TritonError, code, None) if isinstance(code, str) else code
    return pb_utils.TritonError(message) if value is None else pb_utils.TritonError(message,
                                                                                      value)


def _copy_error(error):
    """The same error, status included, for this model's client."""
    code = error.code() if hasattr(error, "code") else None
    return _error(error.message(), code)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        # Twice the target's slots: requests waiting here are cheap, and the target queues.
        options = ServingOptions.from_parameters(params)
        self.limits = Limits.from_parameters(params)
        # <name>_txt2img passes its requests to <name>_txt2img_stream.
        self.target = pipeline_names(served_name(args["model_name"]))[1]
        self.pool = RequestPool(2 * options.max_concurrent, args["model_name"])
        # request_id -> [the client's request, or None once answered]; with `lock` held, so
        # the watcher never asks a request that has been answered: Triton 2.51 frees its
        # response factory with the final response, and is_cancelled() then segfaults.
        self.inflight: dict[str, list] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self.watch, name="cancel-watcher", daemon=True)
        self.watcher.start()

    def execute(self, requests):
        for request in requests:
            # Copied now: the thread may run after execute() has returned.
            inputs = {t.name(): t.as_numpy().copy() for t in request.inputs()}
            self.pool.submit(self.run, self.reject, request, inputs)
        return None

    def reject(self, request, inputs):
        request.get_response_sender().send(pb_utils.InferenceResponse(
            error=_error("the model is being unloaded", "UNAVAILABLE")), flags=FINAL)

    def run(self, request, inputs):
        sender = request.get_response_sender()
        try:
            req = GenerationRequest.from_inputs(inputs).resolve(self.limits)
        except InvalidRequest as e:
            sender.send(pb_utils.InferenceResponse(error=_error(str(e), "INVALID_ARG")),
                        flags=FINAL)
            return
        request_id = uuid.uuid4().hex
        tensors = [pb_utils.Tensor(name, array) for name, array in req.to_inputs().items()]
        bls = pb_utils.InferenceRequest(
            model_name=self.target, inputs=tensors, requested_output_names=OUTPUTS,
            parameters={"progress": "none", "request_id": request_id})
        entry = [request]
        with self.lock:
            self.inflight[request_id] = entry
        final = self.forward(bls)
        with self.lock:
            self.inflight.pop(request_id, None)
            entry[0] = None
        sender.send(final, flags=FINAL)

    def forward(self, bls):
        """The target's final response to `bls`, as this model's response."""
        final = None
        try:
            for response in bls.exec(decoupled=True):
                if response.has_error():
                    final = pb_utils.InferenceResponse(error=_copy_error(response.error()))
                elif pb_utils.get_output_tensor_by_name(response, "images") is not None:
                    final = pb_utils.InferenceResponse(response.output_tensors())
        except Exception as e:  # noqa: BLE001 - becomes this request's error
            final = pb_utils.InferenceResponse(error=_error(f"internal error: {e}", "INTERNAL"))
        if final is None:
            final = pb_utils.InferenceResponse(error=_error(f"{self.target} sent no images",
                                                            "INTERNAL"))
        return final

    def watch(self):
        cancelled = set()
        # 50 ms: a small model runs ~20 UNet steps in that time; the poll is one cheap call
        # per request in flight.
        while not self.stop.wait(0.05):
            with self.lock:
                newly = [request_id for request_id, (request,) in self.inflight.items()
                         if request_id not in cancelled and request is not None
                         and request.is_cancelled()]
                cancelled &= set(self.inflight)
            for request_id in newly:  # outside the lock: a BLS round trip
                cancelled.add(request_id)
                self.cancel(request_id)

    def cancel(self, request_id):
        """Ask the target to stop request `request_id` (see the module docstring)."""
        prompt = pb_utils.Tensor("prompt", np.array([b""], dtype=np.object_))
        message = pb_utils.InferenceRequest(model_name=self.target, inputs=[prompt],
                                            requested_output_names=OUTPUTS,
                                            parameters={"cancel": request_id})
        for _ in message.exec(decoupled=True):
            pass

    def finalize(self):
        self.pool.shutdown()
        self.stop.set()
