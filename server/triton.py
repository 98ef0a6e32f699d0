"""Find, prepare and run a Triton Inference Server binary against a model repository.

Where the binary comes from, in order:

1. an explicit path (`--tritonserver /opt/tritonserver/bin/tritonserver`);
2. `tritonserver` on PATH (NVIDIA's container, which also has the ONNX Runtime and TensorRT
   backends);
3. the copy bundled in the PyPI wheel `nvidia-pytriton` (CPU hosts, Python backend only). The
   wheel's folder is read-only in spirit, so it is copied once to
   `~/.cache/ldm-serve/tritonserver-<version>-py<X.Y>/` together with the Python-backend stub
   built for the running interpreter (what PyTriton itself does at start-up).

Example::

    with TritonServer("model_repository", log_path="triton.log") as server:
        print(server.http_url, server.grpc_url)

or in the foreground, until Ctrl-C::

    python -m server.triton model_repository --grpc-port 8001 [--tritonserver PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from server.shm import mapped_regions, remove_unmapped
from server.triton_install import (  # noqa: F401 - public here too
    CACHE_ENV,
    TritonInstall,
    cache_root,
    find_tritonserver,
    prepare_pytriton,
    prepend_path,
    python_libdir,
)

log = logging.getLogger(__name__)

# An unmapped region younger than this may belong to a server that is just starting.
STALE_REGION_AGE = 60.0
# The folder holding the `ldm` and `server` packages: Python-backend models import them.


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now (all bound at once, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


PACKAGES = ("ldm", "export", "server")


def check_package_importable(env: dict[str, str], python: str = sys.executable) -> None:
    """Our models' model.py files import this project's packages: check that the Python
    Triton runs (this interpreter, with Triton's environment, from another folder) finds
    them, and say how to fix it if not, instead of a model that fails to load."""
    code = ("import importlib.util as u, sys; "
            f"sys.exit(0 if all(u.find_spec(p) for p in {PACKAGES!r}) else 1)")
    if subprocess.call([python, "-c", code], env=env, cwd="/") != 0:
        raise RuntimeError(
            f"the Python that Triton's models run ({python}) cannot import "
            f"{', '.join(PACKAGES)}: install this project into it (`pip install -e .`; "
            "`make setup` does)")


class TritonServer:
    """One `tritonserver` process serving `repository`, reachable on `host` only.

    Ports default to free ones. `start()` returns once `/v2/health/ready` answers 200 (every
    model loaded), and raises with the end of the log if the process exits or the deadline
    passes first.
    """

    def __init__(
        self,
        repository: str | Path | Sequence[str | Path],
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
        tritonserver: str | Path | None = None,
        pythonpath: tuple[str | Path, ...] = (),
        extra_args: tuple[str, ...] = (),
        log_verbose: int = 0,
        die_with_parent: bool = True,
        models: tuple[str, ...] | None = None,
    ):
        # One repository per served model (several: one Triton serves them all).
        paths = [repository] if isinstance(repository, (str, Path)) else list(repository)
        self.repositories = tuple(Path(r).resolve() for r in paths)
        self.repository = self.repositories[0]
        ports = free_ports(3)
        self.http_port = http_port or ports[0]
        self.grpc_port = grpc_port or ports[1]
        self.metrics_port = metrics_port or ports[2]
        self.host = host
        self.log_path = Path(log_path) if log_path else None
        self.tritonserver = tritonserver
        self.pythonpath = tuple(str(p) for p in pythonpath)
        self.extra_args = tuple(extra_args)
        self.log_verbose = log_verbose
        # SIGTERM the server when this process dies (Linux), so a killed test run or launcher
        # leaves no orphan server holding ports and memory.
        self.die_with_parent = die_with_parent
        # None: every model in the repository; else only these (explicit model control).
        self.models = tuple(models) if models is not None else None
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self.regions: set[Path] = set()  # this server's shared-memory regions (server/shm.py)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.binary),
            *(f"--model-repository={r}" for r in self.repositories),
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={m}" for m in self.models]
        if install.backend_dir is not None:
            cmd.append(f"--backend-directory={install.backend_dir}")
        if install.cache_dir is not None:
            cmd.append(f"--cache-directory={install.cache_dir}")
        return [*cmd, *self.extra_args]

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = {**os.environ, **install.env}
        if self.pythonpath:
            env["PYTHONPATH"] = prepend_path("PYTHONPATH", os.pathsep.join(self.pythonpath), env)
        return env

    def start(self, timeout: float = 180.0) -> TritonServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        install = find_tritonserver(self.tritonserver)
        check_package_importable(self.environment(install))
        remove_unmapped(min_age=STALE_REGION_AGE)  # what crashed servers left in /dev/shm
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = self.command(install)
        log.info("starting %s (log: %s)", " ".join(cmd), self.log_path)
        prefix, preexec = _die_with_parent() if self.die_with_parent else ([], None)
        self.process = subprocess.Popen(
            prefix + cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=self.environment(install), start_new_session=True,
            preexec_fn=preexec,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.regions = mapped_regions([self.process.pid])
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            if not self.is_alive():
                raise RuntimeError(
                    f"tritonserver exited with code {self.process.returncode} before it was "
                    f"ready; log tail:\n{self.log_tail()}"
                )
            if _http_ok(url):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"tritonserver not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stubs(self) -> dict[str, int]:
        """{model: live Python-backend stub processes}, from the server's process group."""
        counts: dict[str, int] = {}
        if self.process is None:
            return counts
        for pid in _group_pids(self.process.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"triton_python_backend_stub") and len(cmd) > 1:
                model = Path(cmd[1].decode(errors="replace")).parent.parent.name
                counts[model] = counts.get(model, 0) + 1
        return counts

    def dead_stubs(self, expected: dict[str, int]) -> list[str]:
        """Models with fewer live stubs than `expected` (a stub killed or crashed: Triton
        does not restart it, and keeps reporting the model ready)."""
        now = self.stubs()
        return sorted(m for m, n in expected.items() if now.get(m, 0) < n)

    def answers_probe(self, model: str = "ldm_txt2img_stream", timeout: float = 5.0) -> bool:
        """Whether `model`'s stub answers a `health` request within `timeout` seconds (a
        stub that is alive but wedged, e.g. stopped or deadlocked, does not)."""
        url = f"http://{self.http_url}/v2/models/{model}/generate_stream"
        body = json.dumps({"prompt": "", "health": True}).encode()
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                r.read()
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_ready(self) -> bool:
        return self.is_alive() and _http_ok(f"http://{self.http_url}/v2/health/ready")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests and unloads), then SIGKILL; the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s: killing it", timeout)
                proc.kill()
                proc.wait()
        # Python-backend stubs share the server's process group (start_new_session). A server
        # that was killed or crashed leaves them orphaned, some blocked for good: end them all.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _wait_group_gone(proc.pid)
        remove_unmapped(self.regions)  # a killed server cannot remove its own
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return proc.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_group_gone(pgid: int, timeout: float = 5.0) -> None:
    """Wait until every process of group `pgid` has exited (zombies included: they have
    released their memory maps, so their shared-memory regions are free)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_pids(pgid):
        time.sleep(0.05)


def _group_pids(pgid: int) -> list[int]:
    """Live processes of group `pgid` (zombies left out: they hold no memory maps)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(d.name))
    return found


def _die_with_parent() -> tuple[list[str], Callable[[], None] | None]:
    """(command prefix, preexec_fn) that make the child get SIGTERM when this process exits.

    `setpriv --pdeathsig` (util-linux) when available: a `preexec_fn` forces a plain fork(),
    and in a process that has used gRPC (tritonclient.grpc) the forked child then aborts now
    and then ("Epoll1Poller ... epoll_wait error: Bad file descriptor", about 1 start in 20
    here) before it reaches exec.
    """
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--"], None
    return [], _parent_death_signal


def _parent_death_signal() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent exits."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def add_port_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--{prefix}http-port, --{prefix}grpc-port, --{prefix}metrics-port: Triton's three ports,
    with its defaults 8000, 8001, 8002. argparse stores them as {prefix}http_port etc. (dashes
    to underscores), e.g. args.http_port, or args.triton_http_port with prefix "triton-"."""
    for kind, default in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        parser.add_argument(f"--{prefix}{kind}-port", type=int, default=default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server.triton",
                                description="Run tritonserver on a model repository.")
    p.add_argument("repository", type=Path, nargs="?", default=Path("model_repository"))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    add_port_arguments(p)
    p.add_argument("--tritonserver", type=Path,
                   help="binary to run (default: tritonserver on PATH, else nvidia-pytriton's)")
    p.add_argument("--log", type=Path, help="log file (default: a temporary file)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for ready")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.repository.is_dir():
        print(f"error: no model repository at {args.repository}", file=sys.stderr)
        return 1
    server = TritonServer(args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host, log_path=args.log,
                          tritonserver=args.tritonserver)
    try:
        server.start(args.timeout)
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ready: http {server.http_url}, grpc {server.grpc_url}, metrics {server.metrics_url}"
          f" (log {server.log_path})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        while server.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
