"""`python -m server` started as a user starts it (a child process, free ports), for the
benchmarks that measure the whole served process set: bench.scale and bench.soak."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Served:
    proc: subprocess.Popen
    url: str  # the gateway, http://127.0.0.1:<port>
    triton_http: str  # host:port
    triton_grpc: str

    def stop(self, timeout: float = 120.0) -> None:
        """SIGTERM (the launcher stops the gateway, then Triton), then SIGKILL."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(server_args: list[str], timeout: float, quiet: bool = False) -> Served:
    """`python -m server *server_args` on free ports, once its /readyz answers 200; stopped
    again (and SystemExit) if it exits or is not ready within `timeout` seconds."""
    from server.triton import free_ports

    port, http, grpc, metrics = free_ports(4)
    cmd = [sys.executable, "-m", "server", *server_args, "--port", str(port),
           "--triton-http-port", str(http), "--triton-grpc-port", str(grpc),
           "--triton-metrics-port", str(metrics)]
    if not quiet:
        print(f"[{time.strftime('%H:%M:%S')}] serve: {' '.join(cmd)}", flush=True)
    out = subprocess.DEVNULL if quiet else None
    served = Served(subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=out),
                    f"http://127.0.0.1:{port}", f"127.0.0.1:{http}", f"127.0.0.1:{grpc}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            raise SystemExit(f"python -m server exited with {served.proc.returncode}")
        try:
            if httpx.get(served.url + "/readyz", timeout=5).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        time.sleep(1)
    served.stop()
    raise SystemExit(f"server not ready after {timeout:.0f} s")
