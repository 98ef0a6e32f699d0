"""Where a runnable `tritonserver` comes from (see server/triton.py's docstring for the order):
an explicit path, `tritonserver` on PATH, or the copy bundled in the PyPI wheel
`nvidia-pytriton`, prepared once in `~/.cache/ldm-serve/` with the Python-backend stub built
for the running interpreter.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("server.triton")

CACHE_ENV = "LDM_SERVE_CACHE"


@dataclass(frozen=True)
class TritonInstall:
    """A runnable `tritonserver`: the binary, its backends folder and the environment it needs."""

    binary: Path
    backend_dir: Path | None = None  # None: the binary's built-in default
    cache_dir: Path | None = None  # response-cache plugins (`--cache-directory`)
    env: dict[str, str] = field(default_factory=dict)  # added to / prepended in os.environ


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/ldm-serve")).expanduser()


def prepend_path(var: str, value: str, env: dict[str, str] | None = None) -> str:
    old = (env or os.environ).get(var, "")
    return f"{value}{os.pathsep}{old}" if old else value


def prepare_pytriton(cache: Path | None = None) -> TritonInstall:
    """Copy the wheel's `tritonserver` folder (plus the matching stub) into the cache, once.

    The copy is built beside its final name and renamed into place, so concurrent callers and
    interrupted copies never leave a half-written server behind.
    """
    try:
        import pytriton
    except ImportError as e:
        raise FileNotFoundError(
            "no tritonserver: pass --tritonserver PATH, put one on PATH, or "
            "`pip install nvidia-pytriton`"
        ) from e
    from importlib.metadata import version

    pkg = Path(pytriton.__file__).parent
    dist = pkg / "tritonserver"
    libs = pkg.parent / "nvidia_pytriton.libs"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise FileNotFoundError(f"nvidia-pytriton has no Python-backend stub for {py} ({have})")
    target = (cache or cache_root()) / f"tritonserver-{version('nvidia-pytriton')}-py{py}"
    if not (target / "bin" / "tritonserver").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            shutil.copytree(dist, tmp / "t", ignore=shutil.ignore_patterns("python_backend_stubs"))
            shutil.copy2(stub, tmp / "t" / "backends" / "python" / "triton_python_backend_stub")
            try:
                os.replace(tmp / "t", target)
            except OSError:  # another process won the race: use its copy
                if not (target / "bin" / "tritonserver").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("prepared tritonserver from nvidia-pytriton in %s", target)
    venv_bin = str(Path(sys.executable).parent)
    lib_path = str(libs)
    own = python_libdir()
    if own is not None:
        lib_path = f"{own}{os.pathsep}{lib_path}"
    return TritonInstall(
        binary=target / "bin" / "tritonserver",
        backend_dir=target / "backends",
        cache_dir=target / "caches",
        # The stub embeds libpython; with the venv's bin first on PATH it also finds the
        # venv's site-packages (numpy, torch, onnxruntime).
        env={"LD_LIBRARY_PATH": prepend_path("LD_LIBRARY_PATH", lib_path),
             "PATH": prepend_path("PATH", venv_bin)},
    )


def python_libdir() -> Path | None:
    """The folder of the running interpreter's shared libpython, when it has one.

    The stub links `libpython3.X.so.1.0` by name; without this the loader may pick the
    system's (Debian's 3.11.2 here) while the standard-library extension modules come from
    this interpreter (pyenv's 3.11.7): `import ssl` (hence transformers) then fails with
    "undefined symbol: _PyModule_Add".
    """
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file():
        return Path(libdir)
    return None


def find_tritonserver(explicit: str | Path | None = None) -> TritonInstall:
    """The binary to run: `explicit`, else `tritonserver` on PATH, else nvidia-pytriton's."""
    if explicit is not None:
        binary = Path(explicit)
        if not binary.is_file():
            raise FileNotFoundError(f"no tritonserver binary at {binary}")
        backends = binary.resolve().parent.parent / "backends"
        return TritonInstall(binary, backends if backends.is_dir() else None)
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path))
    return prepare_pytriton()
