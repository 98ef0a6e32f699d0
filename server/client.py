"""Text-to-image over Triton gRPC: an importable client and a command line with a progress bar.

    python -m server.client "a red circle in the top left" -o out.png --steps 25 --seed 1

The CLI streams from `ldm_txt2img_stream` (one progress message per sampler step) and writes
one PNG per image (`out.png`, or `out_0.png`, `out_1.png`, ... for several). In code::

    with Txt2ImgClient("localhost:8001") as client:
        out = client.generate("a red circle", seed=1)            # ldm_txt2img
        for event in client.iter_stream("a red circle", steps=10):  # ldm_txt2img_stream
            ...  # StreamProgress(step, total, preview) ..., then Txt2ImgOutput

Light on purpose (numpy + tritonclient, no torch): the web gateway imports it too.
"""
from __future__ import annotations

import argparse
import queue
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.contract import (
    DEFAULT_NAME,
    INPUTS,
    STREAM_OUTPUTS,
    GenerationRequest,
    pipeline_names,
)
from server.contract import OUTPUTS as OUTPUT_SPECS

# config.pbtxt data types -> tritonclient's names.
_CLIENT_DTYPES = {"TYPE_STRING": "BYTES", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64",
                  "TYPE_FP32": "FP32"}
OUTPUTS: tuple[str, ...] = tuple(OUTPUT_SPECS)
__all__ = ["OUTPUTS", "STREAM_OUTPUTS", "StreamProgress", "Txt2ImgClient", "Txt2ImgError",
           "Txt2ImgOutput", "as_request", "build_inputs", "grpc_client", "main",
           "output_from_result", "save_pngs"]


class Txt2ImgError(RuntimeError):
    """A failed request; `status` is Triton's code ("StatusCode.INVALID_ARGUMENT", "400")."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status

    @property
    def invalid_argument(self) -> bool:
        return self.status in ("StatusCode.INVALID_ARGUMENT", "400")

    @classmethod
    def wrap(cls, exc: Exception) -> Txt2ImgError:
        message = exc.message() if hasattr(exc, "message") else str(exc)
        status = exc.status() if hasattr(exc, "status") else None
        return cls(message, None if status is None else str(status))


@dataclass
class Txt2ImgOutput:
    images: np.ndarray  # (N, H, W, 3) uint8
    used_seed: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class StreamProgress:
    step: int  # steps done (1-based)
    total: int
    preview: np.ndarray | None = None  # (N, h, w, 3) uint8


def as_request(prompt: str | GenerationRequest, params: dict) -> GenerationRequest:
    """`prompt` and `generate`'s keyword parameters as the request; None: the model's default."""
    if isinstance(prompt, GenerationRequest):
        if params:
            raise ValueError("pass a GenerationRequest or a prompt with parameters, not both")
        return prompt
    return GenerationRequest(prompt=prompt, **params)


def build_inputs(module, request: GenerationRequest) -> list:
    """tritonclient InferInputs (`module` is tritonclient.grpc or .http) of `request`'s set
    fields; those left None are absent (the server's default applies)."""
    inputs = []
    for name, array in request.to_inputs().items():
        inp = module.InferInput(name, [1], _CLIENT_DTYPES[INPUTS[name][0]])
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


def output_from_result(result) -> Txt2ImgOutput:
    warnings = result.as_numpy("warnings")
    seed = result.as_numpy("used_seed")
    return Txt2ImgOutput(
        images=result.as_numpy("images"),
        used_seed=int(seed.reshape(-1)[0]) if seed is not None else -1,
        warnings=[w.decode() if isinstance(w, bytes) else str(w)
                  for w in (warnings.reshape(-1) if warnings is not None else [])],
    )


class Txt2ImgClient:
    """Client of the `ldm_txt2img` and `ldm_txt2img_stream` Triton models.

    `generate` uses gRPC (or HTTP with protocol="http"); `iter_stream`/`stream` use gRPC
    streaming on a channel of their own, so one client may run several streams at once.
    """

    def __init__(self, url: str = "localhost:8001", *, protocol: str = "grpc",
                 model: str = "ldm_txt2img", stream_model: str = "ldm_txt2img_stream",
                 timeout: float | None = None):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol {protocol!r}; allowed: grpc, http")
        self.url, self.protocol = url, protocol
        self.model, self.stream_model = model, stream_model
        self.timeout = timeout
        self._module = _tritonclient(protocol)
        if protocol == "http" and timeout is not None:
            self._client = self._module.InferenceServerClient(
                url, connection_timeout=timeout, network_timeout=timeout)
        elif protocol == "grpc":
            self._client = grpc_client(url)
        else:
            self._client = self._module.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Txt2ImgClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    def generate(self, prompt: str | GenerationRequest, **params) -> Txt2ImgOutput:
        """Images for `prompt`; params: GenerationRequest's fields (negative_prompt, steps,
        guidance_scale, seed, sampler, num_images, height, width; None: the server's
        default)."""
        inputs = build_inputs(self._module, as_request(prompt, params))
        outputs = [self._module.InferRequestedOutput(n) for n in OUTPUTS]
        kwargs = {}
        if self.timeout is not None and self.protocol == "grpc":
            kwargs = {"client_timeout": self.timeout}
        try:
            result = self._client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except Exception as e:  # tritonclient's InferenceServerException
            raise Txt2ImgError.wrap(e) from e
        return output_from_result(result)

    def iter_stream(self, prompt: str | GenerationRequest,
                    **params) -> Iterator[StreamProgress | Txt2ImgOutput]:
        """StreamProgress per sampler step, then the Txt2ImgOutput.

        Closing the iterator early cancels the request on the server (the loop stops before
        its next UNet call); wrap it in `contextlib.closing` to close it at a `break`.
        """
        if self.protocol != "grpc":
            raise ValueError("streaming needs the gRPC protocol")
        import tritonclient.grpc as grpcclient

        inputs = build_inputs(grpcclient, as_request(prompt, params))
        events: queue.Queue = queue.Queue()
        client = grpc_client(self.url)
        finished = False
        try:
            client.start_stream(callback=lambda result, error: events.put((result, error)),
                                stream_timeout=self.timeout)
            client.async_stream_infer(self.stream_model, inputs, request_id=uuid.uuid4().hex)
            while True:
                result, error = events.get()
                if error is not None:
                    finished = True
                    raise Txt2ImgError.wrap(error)
                if result.as_numpy("images") is not None:
                    finished = True
                    yield output_from_result(result)
                    return
                step, total = result.as_numpy("step"), result.as_numpy("total")
                yield StreamProgress(int(step.reshape(-1)[0]), int(total.reshape(-1)[0]),
                                     result.as_numpy("preview"))
        finally:
            try:
                client.stop_stream(cancel_requests=not finished)
            finally:
                client.close()

    def stream(self, prompt: str, on_progress: Callable[[StreamProgress], object] | None = None,
               **params) -> Txt2ImgOutput:
        """`iter_stream` with a callback per step; returns the final output."""
        for event in self.iter_stream(prompt, **params):
            if isinstance(event, Txt2ImgOutput):
                return event
            if on_progress is not None:
                on_progress(event)
        raise Txt2ImgError("stream ended without images")


# gRPC's reconnect backoff grows to 120 s, and channels with equal options share one
# connection and its backoff: after a Triton restart every new client (and stream) would keep
# failing with UNAVAILABLE for as long. A loopback or in-cluster server is cheap to retry.
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 100,
                        "grpc.min_reconnect_backoff_ms": 100,
                        "grpc.max_reconnect_backoff_ms": 1000}


def grpc_client(url: str):
    """A tritonclient gRPC client with tritonclient's default channel options (no message size
    limit, its keepalive settings) and a short reconnect backoff."""
    import tritonclient.grpc as grpcclient

    keepalive = grpcclient.KeepAliveOptions()
    args = [("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            *RECONNECT_BACKOFF_MS.items()]
    return grpcclient.InferenceServerClient(url, channel_args=args)


def _tritonclient(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def save_pngs(images: np.ndarray, output: Path) -> list[Path]:
    """Write (N, H, W, 3) uint8 images: `output` for one, `<stem>_<i><suffix>` for several."""
    from PIL import Image

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        paths = [output]
    else:
        paths = [output.with_name(f"{output.stem}_{i}{output.suffix or '.png'}")
                 for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        Image.fromarray(image).save(path, format="PNG")
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server.client", description=__doc__.split("\n")[0])
    p.add_argument("prompt")
    p.add_argument("-o", "--output", type=Path, default=Path("out.png"))
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--sampler", help="ddim, plms, dpmpp_2m or ddpm (server default: ddim)")
    p.add_argument("--num-images", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    p.add_argument("--model", default=DEFAULT_NAME,
                   help="the served model's name: its Triton models are NAME_txt2img and "
                        "NAME_txt2img_stream (default: %(default)s)")
    p.add_argument("--no-stream", action="store_true",
                   help="call NAME_txt2img (no progress bar) instead of NAME_txt2img_stream")
    p.add_argument("--timeout", type=float, help="seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = {"negative_prompt": args.negative_prompt, "steps": args.steps,
              "guidance_scale": args.guidance_scale, "seed": args.seed,
              "sampler": args.sampler, "num_images": args.num_images,
              "height": args.height, "width": args.width}
    try:
        front, stream = pipeline_names(args.model)
        with Txt2ImgClient(args.url, model=front, stream_model=stream,
                           timeout=args.timeout) as client:
            if args.no_stream:
                out = client.generate(args.prompt, **params)
            else:
                out = _stream_with_bar(client, args.prompt, params)
    except Txt2ImgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for w in out.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for path in save_pngs(out.images, args.output):
        print(path)
    print(f"seed {out.used_seed}", file=sys.stderr)
    return 0


def _stream_with_bar(client: Txt2ImgClient, prompt: str, params: dict) -> Txt2ImgOutput:
    from tqdm import tqdm

    bar = None
    try:
        for event in client.iter_stream(prompt, **params):
            if isinstance(event, Txt2ImgOutput):
                return event
            if bar is None:
                bar = tqdm(total=event.total, desc="denoising", unit="step", file=sys.stderr)
            bar.update(event.step - bar.n)
    finally:
        if bar is not None:
            bar.close()
    raise Txt2ImgError("stream ended without images")


if __name__ == "__main__":
    sys.exit(main())
