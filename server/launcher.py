"""`python -m server`: export when needed, run Triton and the gateway, keep Triton alive.

    python -m server --checkpoint checkpoints/demo/ldm --port 8080
    python -m server --checkpoint model.ckpt --compvis-config txt2img-1p4B-eval.yaml
    python -m server --name shapes --model emoji=checkpoints/emoji/ldm   # two models

Several models are served at once: the main one (`--checkpoint`, `--name`, the default of
requests that name none) and each `--model NAME=CHECKPOINT`, each in a repository of its own
(server/served.py), all in one Triton; the gateway finds them there (GET /v1/models).

1. build the Triton repository from the checkpoint (ours, or a CompVis release file with
   --compvis-config), or reuse it when its manifest says it is up to date
   (`python -m server.build` in a child process: export/build_engines.py with the same
   options, so a repository built beforehand by `python export/build_engines.py --backend B
   --out R` is reused as is, then the pipeline models on top). A repository built from
   another checkpoint is never replaced unless --replace says so;
2. start tritonserver and wait until the served models are loaded: the pipeline models,
   plus the component networks only where the pipeline calls them (or --component-models);
3. serve the gateway (uvicorn, in a thread of this process) and print the URLs;
4. watch Triton: when it exits, or a model's stub process dies (checked every 0.5 s), report
   it and start Triton again on the same ports, at most --max-restarts times per
   --restart-window seconds (then give up, stop and exit 1). Meanwhile the gateway answers
   /readyz with 503 and requests with 503, instead of hanging;
5. on Ctrl-C or SIGTERM stop the gateway (in-flight requests get a few seconds), then Triton
   (which drains its own), and exit 0.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from server.contract import (
    DEFAULT_NAME,
    NETWORK_MODES,
    PRECISIONS,
    is_streaming,
    pipeline_names,
)
from server.served import (  # noqa: F401 - resolve_checkpoint: public here too
    DEFAULT_CHECKPOINT,
    ServedModel,
    ensure_repository,
    model_argument,
    resolve_checkpoint,
    served_models_of,
)
from server.triton import TritonServer, add_port_arguments

log = logging.getLogger(__name__)



class Shutdown(Exception):
    """Raised in the main thread by SIGINT/SIGTERM."""


class TritonWatchdog:
    """Starts Triton, then restarts it from a watchdog thread whenever it exits.

    `make()` returns a fresh (unstarted) TritonServer on the same ports. The watchdog thread
    polls `is_alive()` and the models' Python-backend stub processes (Triton 2.51 neither
    restarts a dead stub nor stops calling the model ready: its requests hang), and probes the
    pipeline model so that a wedged stub is found too (`_wedged`); restarts back
    off 1, 2, 4, ... s and are bounded by `max_restarts` per `window` seconds. `failed` is
    set (with `reason`) when it gives up.
    """

    def __init__(self, make: Callable[[], TritonServer], *, max_restarts: int = 5,
                 window: float = 600.0, poll: float = 0.5, start_timeout: float = 300.0,
                 probe_every: float = 2.0, probe_timeout: float = 2.0):
        self.make, self.max_restarts, self.window = make, max_restarts, window
        self.poll, self.start_timeout = poll, start_timeout
        # A stub that is alive but wedged answers no probe: two missed in a row (at most
        # probe_every + 2 probe_timeout, 6 s by default) and Triton is restarted.
        self.probe_every, self.probe_timeout = probe_every, probe_timeout
        self._next_probe, self._missed = 0.0, 0
        self.server: TritonServer | None = None
        self.expected_stubs: dict[str, int] = {}  # model -> stub processes when it started
        self.restarts: list[float] = []  # monotonic times of the restarts in the window
        self.failed = threading.Event()
        self.reason = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="triton-watchdog", daemon=True)

    def start(self) -> TritonServer:
        """Start Triton (blocking until ready), then the watchdog thread."""
        self.server = self.make()
        self.server.start(self.start_timeout)
        self.expected_stubs = self.server.stubs()
        self._thread.start()
        return self.server

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            server = self.server
            if server is None or not self._failed(server):
                continue
            # Closes its log file. A server with a dead stub would wait on that stub's hung
            # requests while draining: 2 s, then it is killed and its clients get errors.
            server.stop(timeout=2.0)
            if not self._restart():
                self.failed.set()
                return

    def _failed(self, server: TritonServer) -> bool:
        """Triton exited, or a model's stub process died (its requests would hang and every
        later one fail, while Triton still says ready): either way, restart."""
        if not server.is_alive():
            code = server.process.returncode if server.process else None
            log.error("tritonserver exited unexpectedly (exit code %s); end of its log:\n%s",
                      code, server.log_tail(15))
            return True
        dead = server.dead_stubs(self.expected_stubs)
        if dead:
            log.error("the Python-backend stub of %s died: restarting tritonserver",
                      ", ".join(dead))
            return True
        return self._wedged(server)

    def _wedged(self, server: TritonServer) -> bool:
        """Probe each streaming pipeline every `probe_every` s; two unanswered probes in a
        row: wedged."""
        streams = sorted(m for m in self.expected_stubs if is_streaming(m))
        now = time.monotonic()
        if not streams or now < self._next_probe:
            return False
        self._next_probe = now + self.probe_every
        silent = [m for m in streams if not server.answers_probe(m, timeout=self.probe_timeout)]
        self._missed = self._missed + 1 if silent else 0
        if self._missed >= 2:
            log.error("%s answered no health probe for %d tries: its stub is wedged; "
                      "restarting tritonserver", ", ".join(silent), self._missed)
            self._missed = 0
            return True
        return False

    def _restart(self) -> bool:
        while not self._stop.is_set():
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < self.window]
            if len(self.restarts) >= self.max_restarts:
                self.reason = (f"tritonserver exited {len(self.restarts) + 1} times in "
                               f"{self.window:.0f} s: giving up")
                log.error("%s", self.reason)
                return False
            self.restarts.append(now)
            delay = min(2.0 ** (len(self.restarts) - 1), 30.0)
            log.warning("restarting tritonserver in %.0f s (restart %d of at most %d per "
                        "%.0f s)", delay, len(self.restarts), self.max_restarts, self.window)
            if self._stop.wait(delay):
                return True
            server = self.make()
            self.server = server  # before start(): stop() can then interrupt a slow start
            try:
                server.start(self.start_timeout)
            except Exception as e:  # noqa: BLE001 - counted, then retried
                log.error("tritonserver restart failed: %s", e)
                continue
            self.expected_stubs = server.stubs()
            log.warning("tritonserver is back (pid %d)", server.process.pid)
            return True
        return True

    def stop(self) -> int | None:
        """Stop watching and stop Triton; its exit code."""
        self._stop.set()
        if self.server is not None:
            self.server.stop()
        if self._thread.is_alive():
            self._thread.join(30)
        return self.server.stop() if self.server is not None else None


class Launcher:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.watchdog: TritonWatchdog | None = None
        self.gateway = None
        self.models: list[ServedModel] = []
        self.log_path: Path | None = args.triton_log

    def make_triton(self) -> TritonServer:
        from server.repository import served_models

        a = self.args
        repos = [m.repository for m in self.models]
        loaded = tuple(n for r in repos for n in served_models(r, a.component_models))
        server = TritonServer(repos, http_port=a.triton_http_port,
                              grpc_port=a.triton_grpc_port, metrics_port=a.triton_metrics_port,
                              host=a.triton_host, log_path=self.log_path,
                              tritonserver=a.tritonserver, models=loaded)
        return server

    def run(self) -> int:
        """Start everything and supervise until a signal (Shutdown) or a fatal failure."""
        from server.auth import load_api_keys
        from server.gateway import GatewaySettings, GatewayThread, create_app

        a = self.args
        keys = load_api_keys(a.api_keys_file)
        if keys and a.triton_host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("API keys are on, but Triton listens on %s: its HTTP and gRPC ports "
                        "take requests without a key. Keep Triton on 127.0.0.1 (the default) "
                        "or firewall its ports.", a.triton_host)
        self.models = served_models_of(a)
        for model in self.models:
            ensure_repository(a, model)
        print("starting tritonserver (loading the models)...", flush=True)
        self.watchdog = TritonWatchdog(self.make_triton, max_restarts=a.max_restarts,
                                       window=a.restart_window)
        triton = self.watchdog.start()
        self.log_path = triton.log_path  # restarts append to the same log
        triton_host = "127.0.0.1" if a.triton_host in ("0.0.0.0", "") else a.triton_host
        front, stream = pipeline_names(a.name)  # the default of requests without `model`
        settings = GatewaySettings(triton_url=f"{triton_host}:{triton.grpc_port}",
                                   model=front, stream_model=stream,
                                   api_keys=keys, timeout=a.request_timeout)
        self.gateway = GatewayThread(create_app(settings), host=a.host, port=a.port).start()
        url = self.gateway.url
        print("\n".join([
            "ldm-serve is ready",
            f"  web UI:   {url}/",
            f"  API:      POST {url}/v1/images/generations (+ /stream), models: "
            f"{', '.join(m.name for m in self.models)} (GET {url}/v1/models)",
            f"  docs:     {url}/docs",
            f"  health:   {url}/healthz, {url}/readyz",
            f"  triton:   grpc {triton.grpc_url}, http {triton.http_url}, "
            f"metrics {triton.metrics_url} (pid {triton.process.pid}, log {triton.log_path})",
            f"  API keys: {'required (' + str(len(keys)) + ')' if keys else 'off'}",
            "Ctrl-C to stop.",
        ]), flush=True)
        while True:
            if self.watchdog.failed.wait(0.5):
                print(f"error: {self.watchdog.reason}", file=sys.stderr, flush=True)
                return 1
            if not self.gateway.is_alive():
                print("error: the gateway stopped", file=sys.stderr, flush=True)
                return 1

    def shutdown(self) -> None:
        if self.gateway is not None:
            print("stopping the gateway...", flush=True)
            self.gateway.stop()
        if self.watchdog is not None:
            print("stopping tritonserver...", flush=True)
            code = self.watchdog.stop()
            print(f"tritonserver stopped (exit code {code})", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="Export when needed, run Triton and the HTTP gateway, keep Triton alive.")
    p.add_argument("--checkpoint", type=Path,
                   help="our checkpoint folder, or a CompVis .ckpt/.safetensors with "
                        "--compvis-config (default: the one --repository was built from, "
                        f"else {DEFAULT_CHECKPOINT})")
    p.add_argument("--compvis-config", type=Path,
                   help="CompVis YAML config of a .ckpt (e.g. txt2img-1p4B-eval.yaml)")
    p.add_argument("--unsafe-allow-pickle", action="store_true",
                   help="allow a .ckpt with pickled objects beyond tensors and Lightning's "
                        "(only for files you trust)")
    p.add_argument("--replace", action="store_true",
                   help="rebuild --repository even though it was built from another checkpoint")
    p.add_argument("--keep-builds", type=int, default=2,
                   help="export cache: builds kept per model (default 2)")
    p.add_argument("--component-models", action="store_true",
                   help="also load text_encoder/unet/vae_decoder/vae_encoder as Triton models "
                        "(loaded anyway when the pipeline calls them: networks=bls)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="Triton model repository to build or reuse (default: %(default)s)")
    p.add_argument("--name", default=DEFAULT_NAME,
                   help="the --checkpoint model's name: requests without `model` get it "
                        "(default: %(default)s)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="serve another model beside it (repeatable), built into "
                        "<repository>-NAME; a CompVis file as NAME=CKPT@CONFIG.yaml")
    p.add_argument("--backend", default="python",
                   help="python (the pipeline runs the networks itself, on the CPU), "
                        "onnxruntime or tensorrt")
    p.add_argument("--work-dir", type=Path, default=Path("build/export"),
                   help="cache of ONNX files and engines (default: %(default)s)")
    p.add_argument("--networks", choices=NETWORK_MODES,
                   help="how the pipeline runs the networks (default: openvino in process "
                        "for --backend python, else bls)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="arithmetic of --networks openvino (default auto: bf16 where the CPU "
                        "has it, else fp32)")
    p.add_argument("--no-export", action="store_true",
                   help="serve --repository as it is, without checking it")
    p.add_argument("--host", default="127.0.0.1", help="gateway address (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8080, help="gateway port")
    p.add_argument("--triton-host", default="127.0.0.1", help="Triton's address")
    add_port_arguments(p, prefix="triton-")
    p.add_argument("--tritonserver", type=Path,
                   help="binary to run (default: tritonserver on PATH, else nvidia-pytriton's)")
    p.add_argument("--triton-log", type=Path, help="Triton's log file (default: a temp file)")
    p.add_argument("--api-keys-file", type=Path,
                   help="one API key per line (also: env LDM_API_KEYS, comma-separated)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds one generation may take")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="Triton restarts allowed per --restart-window")
    p.add_argument("--restart-window", type=float, default=600.0, help="seconds")
    return _checked(p, p.parse_args(argv))


def _checked(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The parsed arguments, with --model parsed and the paths checked (p.error if not)."""
    args.model = [model_argument(p, item) for item in args.model]
    names = [args.name, *(n for n, _, _ in args.model)]
    if len(set(names)) < len(names):
        p.error(f"model names must differ: {names}")
    if args.compvis_config is not None and not args.compvis_config.is_file():
        p.error(f"--compvis-config {args.compvis_config}: no such file")
    if args.keep_builds < 1:
        p.error(f"--keep-builds {args.keep_builds}: must be >= 1")
    if args.api_keys_file is not None and not args.api_keys_file.is_file():
        p.error(f"--api-keys-file {args.api_keys_file}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def on_signal(signum, frame):
        # Once: a second Ctrl-C while stopping must not interrupt the clean-up.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise Shutdown(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    launcher = Launcher(args)
    code = 0
    try:
        code = launcher.run()
    except Shutdown as s:
        print(f"{s}: shutting down", flush=True)
    except SystemExit as e:  # ensure_repository's messages
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr, flush=True)
            code = 2
        else:
            code = e.code or 0
    except Exception as e:  # noqa: BLE001 - reported, then everything is stopped
        log.exception("launcher failed")
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        launcher.shutdown()
    return code
