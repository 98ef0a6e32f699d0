"""`python -m server` as a user runs it: a subprocess on free ports, against the tiny checkpoint.

It exports the repository, starts Triton and the gateway and prints the URLs; a generation
works; Triton killed with SIGKILL is restarted and /readyz comes back to 200; SIGTERM stops
everything (no tritonserver or Python-backend stub left) with exit code 0.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.triton import free_ports
from tests.server.serving import decode_png, read_sse

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class Output:
    """Collects a process's output lines from a reader thread (the pipe never fills up)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + self.text(60))

    def text(self, last: int | None = None) -> str:
        return "\n".join(self.lines[-last:] if last else self.lines)


def children(pid: int) -> set[int]:
    """Direct children of `pid`, over all its threads (the watchdog thread starts Triton)."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def tritonserver_pid(launcher: int) -> int | None:
    found = [p for p in children(launcher) if "tritonserver" in cmdline(p)]
    return found[0] if found else None


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (zombies have none)."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and text in cmdline(int(p.name))]


def wait_status(url: str, status: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(url, timeout=5).status_code == status:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} never answered {status} in {timeout:.0f} s")


@contextlib.contextmanager
def launched(checkpoint: Path, tmp_path: Path, *extra: str):
    """`python -m server --checkpoint CHECKPOINT EXTRA...` on free ports: (process, its
    output, the main repository); killed (with any leftovers) when the block ends."""
    port, http_port, grpc_port, metrics_port = free_ports(4)
    repo = tmp_path / "model_repository"
    cmd = [sys.executable, "-m", "server", "--checkpoint", str(checkpoint),
           "--repository", str(repo), "--work-dir", str(tmp_path / "work"),
           "--port", str(port), "--triton-http-port", str(http_port),
           "--triton-grpc-port", str(grpc_port), "--triton-metrics-port", str(metrics_port),
           "--triton-log", str(tmp_path / "triton.log"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = Output(proc.stdout)
    try:
        yield proc, out, repo
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
            for pid in processes_mentioning(str(repo)):  # leftovers of a failed test
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launcher(served_ldm_dir, tmp_path):
    with launched(served_ldm_dir, tmp_path) as running:
        yield running


def test_launcher_serves_restarts_triton_and_stops_cleanly(launcher):
    proc, out, repo = launcher
    url = out.wait_for(r"web UI:\s+(http://\S+)/", proc, timeout=240).group(1)
    assert (repo / "manifest.json").is_file()  # exported from the checkpoint
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    # One resident copy of the networks: the pipeline runs them itself (networks: openvino,
    # the python backend's default), so the component models are in the repository but not
    # loaded.
    triton_http = re.search(r"http (127\.0\.0\.1:\d+)", out.text()).group(1)
    index = httpx.post(f"http://{triton_http}/v2/repository/index", timeout=10).json()
    states = {m["name"]: m.get("state") for m in index}
    assert states["ldm_txt2img"] == states["ldm_txt2img_stream"] == "READY"
    assert {states[m] for m in ("unet", "text_encoder", "vae_decoder")} == {None}, states
    r = httpx.post(f"{url}/v1/images/generations", timeout=60,
                   json={"prompt": "a red circle", "n": 2, "steps": 2, "seed": 3})
    assert r.status_code == 200, r.text
    assert [decode_png(d["b64_json"]).shape for d in r.json()["data"]] == [(16, 16, 3)] * 2

    # Triton dies: the gateway says so (503, not a hang), the launcher starts it again.
    first = tritonserver_pid(proc.pid)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_status(f"{url}/readyz", 503, timeout=10)
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 2},
                   timeout=30)
    assert r.status_code == 503 and "unavailable" in r.json()["error"]["message"]
    wait_status(f"{url}/readyz", 200, timeout=120)
    second = tritonserver_pid(proc.pid)
    assert second not in (None, first)
    assert "tritonserver exited unexpectedly (exit code -9)" in out.text()
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 2},
                   timeout=60)
    assert r.status_code == 200, r.text

    # SIGTERM: gateway, then Triton (and its stubs) stop; exit code 0.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, out.text(60)
    assert "SIGTERM: shutting down" in out.text()
    assert "tritonserver stopped (exit code 0)" in out.text()
    deadline = time.monotonic() + 15
    while processes_mentioning(str(repo)) and time.monotonic() < deadline:
        time.sleep(0.2)  # the killed server's stubs notice their parent is gone
    assert processes_mentioning(str(repo)) == []
    for pid in (first, second):
        assert not Path(f"/proc/{pid}").exists() or cmdline(pid) == ""
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_a_dead_pipeline_stub_fails_its_requests_and_recovers(launcher):
    proc, out, repo = launcher
    url = out.wait_for(r"web UI:\s+(http://\S+)/", proc, timeout=240).group(1)
    triton = tritonserver_pid(proc.pid)
    stub = [p for p in children(triton)
            if "ldm_txt2img_stream/1/model.py" in cmdline(p)]
    assert len(stub) == 1, [cmdline(p) for p in children(triton)]
    events = []
    killed_at = None
    body = {"prompt": "a red circle", "steps": 100}
    with httpx.stream("POST", f"{url}/v1/images/generations/stream", json=body,
                      timeout=60) as r:
        for event, _data in read_sse(r):
            events.append(event)
            if killed_at is None:  # the request is in flight: its stub dies
                killed_at = time.monotonic()
                os.kill(stub[0], signal.SIGKILL)
    assert events[-1] == "error", events[-3:]  # an error, not a hang or an image
    assert time.monotonic() - killed_at < 10
    wait_status(f"{url}/readyz", 200, timeout=30)
    # Found by the watchdog (as a dead stub, or by its health probe), or, when the dying stub
    # takes tritonserver down with it, as Triton's own exit: restarted either way.
    found = [line for line in out.lines if "stub of ldm_txt2img_stream died" in line
             or "answered no health probe" in line
             or "tritonserver exited unexpectedly" in line]
    assert found, out.text(40)
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 2},
                   timeout=60)
    assert r.status_code == 200, r.text


def test_a_wedged_pipeline_stub_is_found_and_recovers(launcher):
    # Alive but unresponsive (stopped here; deadlocked would look the same): no health probe
    # is answered, Triton is restarted, and the service comes back by itself.
    proc, out, repo = launcher
    url = out.wait_for(r"web UI:\s+(http://\S+)/", proc, timeout=240).group(1)
    triton = tritonserver_pid(proc.pid)
    stub = [p for p in children(triton) if "ldm_txt2img_stream/1/model.py" in cmdline(p)]
    assert len(stub) == 1
    stopped_at = time.monotonic()
    os.kill(stub[0], signal.SIGSTOP)
    outcome = {}

    def in_flight():  # sent to the wedged stub: must fail, not hang
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 2},
                       timeout=60)
        outcome.update(status=r.status_code, seconds=time.monotonic() - stopped_at)

    thread = threading.Thread(target=in_flight)
    thread.start()
    out.wait_for(r"stub is wedged; restarting tritonserver", proc, timeout=20)
    assert time.monotonic() - stopped_at < 10  # found within 10 s
    thread.join(30)
    assert outcome.get("status") in (502, 503) and outcome["seconds"] < 10, outcome
    out.wait_for(r"tritonserver is back", proc, timeout=30)
    assert time.monotonic() - stopped_at < 30  # and back within 30 s
    wait_status(f"{url}/readyz", 200, timeout=10)
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 2},
                   timeout=60)
    assert r.status_code == 200, r.text


def test_launcher_reports_a_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(tmp_path / "none"),
                        "--repository", str(tmp_path / "repo")], cwd=PROJECT_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"checkpoint {tmp_path / 'none'} not found" in r.stderr
    assert "holds no built repository" in r.stderr


def test_launcher_never_replaces_a_repository_built_from_another_checkpoint(
        served_ldm_dir, tiny_ldm_dir, tmp_path):
    from export.build_engines import main as build_engines

    repo, work = tmp_path / "repo", tmp_path / "work"
    assert build_engines(["--checkpoint", str(served_ldm_dir), "--out", str(repo),
                          "--work-dir", str(work), "--models", "text_encoder", "--quiet"]) == 0
    before = (repo / "manifest.json").read_text()
    r = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(tiny_ldm_dir),
                        "--repository", str(repo), "--work-dir", str(work)],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert str(served_ldm_dir) in r.stderr and str(tiny_ldm_dir) in r.stderr
    assert "--replace" in r.stderr
    assert (repo / "manifest.json").read_text() == before


def test_launcher_without_checkpoint_uses_the_repositorys_own(served_ldm_dir, tmp_path):
    from export.build_engines import main as build_engines
    from server.launcher import parse_args, resolve_checkpoint

    repo = tmp_path / "repo"
    assert build_engines(["--checkpoint", str(served_ldm_dir), "--out", str(repo),
                          "--work-dir", str(tmp_path / "work"), "--models", "text_encoder",
                          "--quiet"]) == 0
    args = parse_args(["--repository", str(repo)])
    resolve_checkpoint(args)
    assert args.checkpoint == served_ldm_dir
    args = parse_args(["--repository", str(tmp_path / "new")])
    resolve_checkpoint(args)
    assert args.checkpoint == Path("checkpoints/demo/ldm")


def test_launcher_cli_names_bad_values(tmp_path):
    for argv, message in ((["--compvis-config", str(tmp_path / "none.yaml")],
                           "--compvis-config"),
                          (["--keep-builds", "0"], "--keep-builds 0")):
        r = subprocess.run([sys.executable, "-m", "server", *argv], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    r = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(ckpt),
                        "--repository", str(tmp_path / "repo")], cwd=PROJECT_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs --compvis-config" in r.stderr, r.stderr


def test_public_triton_with_api_keys_is_warned_about(tmp_path):
    # Triton's own ports take no key: binding them beyond loopback bypasses the gateway's.
    env = {**os.environ, "LDM_API_KEYS": "k1"}
    r = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(tmp_path / "none"),
                        "--repository", str(tmp_path / "repo"), "--triton-host", "0.0.0.0"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert "API keys are on, but Triton listens on 0.0.0.0" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(tmp_path / "none"),
                        "--repository", str(tmp_path / "repo")],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert "Triton listens on" not in r.stderr


def test_launcher_serves_a_second_model_at_its_own_sampling_defaults(
        served_ldm_dir, tiny_ldm_dir, tmp_path):
    # What `make serve` does with the two demo models: --name for the main one, --model for
    # the other, whose checkpoint records the settings it was evaluated at (ldm.pack).
    from ldm.pack import main as pack

    assert pack(["--ldm", str(tiny_ldm_dir), "--out", str(tmp_path / "packed"),
                 "--no-autoencoder", "--default-steps", "7",
                 "--default-guidance-scale", "4"]) == 0
    other = tmp_path / "packed" / "ldm"
    with launched(served_ldm_dir, tmp_path, "--name", "shapes",
                  "--model", f"tiny={other}") as (proc, out, repo):
        url = out.wait_for(r"web UI:\s+(http://\S+)/", proc, timeout=300).group(1)
        assert (repo.with_name(f"{repo.name}-tiny") / "tiny_txt2img").is_dir()
        listed = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in listed["data"]] == ["shapes", "tiny"]
        own = httpx.get(f"{url}/v1/config", params={"model": "tiny"}, timeout=10).json()
        assert (own["limits"]["default_steps"], own["limits"]["default_guidance_scale"]) == (7, 4)
        main = httpx.get(f"{url}/v1/config", timeout=10).json()
        assert main["model"] == "shapes"
        assert (main["limits"]["default_steps"], main["limits"]["default_guidance_scale"]) \
            == (10, 1.5)  # a checkpoint without `sampling:` keeps the server's defaults
        r = httpx.post(f"{url}/v1/images/generations", timeout=60,
                       json={"prompt": "a red circle", "model": "tiny", "seed": 1})
        assert r.status_code == 200, r.text
        assert decode_png(r.json()["data"][0]["b64_json"]).shape == (16, 16, 3)
