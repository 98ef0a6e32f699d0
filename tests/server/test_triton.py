"""Launcher: the binary from nvidia-pytriton, ports, start/ready/stop, failure reporting."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.triton import (
    TritonServer,
    check_package_importable,
    find_tritonserver,
    free_ports,
    main,
    prepare_pytriton,
)


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_explicit_binary_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tritonserver binary"):
        find_tritonserver(tmp_path / "tritonserver")


def test_prepare_pytriton_copies_binary_and_stub_once(tmp_path):
    install = prepare_pytriton(tmp_path)
    assert os.access(install.binary, os.X_OK)
    stub = install.backend_dir / "python" / "triton_python_backend_stub"
    assert stub.is_file() and (install.backend_dir / "python" / "libtriton_python.so").is_file()
    assert f"py{sys.version_info.major}.{sys.version_info.minor}" in install.binary.parts[-3]
    libs = install.env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert any(p.endswith("nvidia_pytriton.libs") for p in libs)
    assert install.env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    stamp = install.binary.stat().st_mtime_ns
    again = prepare_pytriton(tmp_path)
    assert again.binary == install.binary and install.binary.stat().st_mtime_ns == stamp
    # An explicit path finds the backends beside its bin/ folder.
    assert find_tritonserver(install.binary).backend_dir == install.backend_dir


def test_start_ready_stop(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo, log_path=tmp_path / "triton.log")
    with server:
        assert server.is_alive() and server.is_ready()
        assert server.http_url == f"127.0.0.1:{server.http_port}"
    assert not server.is_alive()
    assert server.process.returncode == 0
    assert "Started GRPCInferenceService" in (tmp_path / "triton.log").read_text()


def test_failed_start_raises_with_the_log_tail(tmp_path):
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('backend: "no_such_backend"\n')
    server = TritonServer(repo, log_path=tmp_path / "triton.log")
    with pytest.raises(RuntimeError, match="exited with code") as e:
        server.start(timeout=60)
    assert "broken" in str(e.value)
    assert not server.is_alive()


def test_cli_refuses_a_missing_repository(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "no model repository" in capsys.readouterr().err


def test_server_dies_with_its_parent(tmp_path):
    """A launcher that is killed leaves no orphan tritonserver behind."""
    repo = tmp_path / "repo"
    repo.mkdir()
    code = ("import sys, time; from server.triton import TritonServer; "
            "s = TritonServer(sys.argv[1]).start(); print(s.process.pid, flush=True); "
            "time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", code, str(repo)], stdout=subprocess.PIPE,
                                text=True, cwd=Path(__file__).parents[2])
    pid = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)
    raise AssertionError("tritonserver outlived its parent")


def test_models_find_the_installed_package():
    # Triton's Python models import this project: the launch checks the interpreter finds it
    # from another folder, and names the fix when it does not.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check_package_importable(env)  # this environment: installed by `make setup`
    bare = shutil.which("python3", path="/usr/bin:/bin")
    with pytest.raises(RuntimeError, match=r"cannot import ldm, export, server: install"):
        check_package_importable(env, python=bare)
