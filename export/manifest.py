"""The repository's manifest and the keys it records: what a build was made from.

`manifest.json` at the repository root holds the key of the last build (sha256 of the
checkpoint files, the options, our source code and the library versions), so an unchanged
rerun does nothing, and the checkpoint it was built from, so a rebuild from another one is
refused (`check_same_checkpoint`) unless asked for.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Folder of the networks' PyTorch weights in a repository built with torch_weights (our
# checkpoint format: config.yaml + model.safetensors), for `networks: torch` pipelines.
TORCH_WEIGHTS = "pytorch"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_files(checkpoint: Path, compvis_config: Path | None) -> list[Path]:
    if checkpoint.is_dir():
        return sorted(p for p in checkpoint.iterdir()
                      if p.is_file() and p.suffix in (".safetensors", ".yaml", ".ckpt", ".pt"))
    return [checkpoint] + ([compvis_config] if compvis_config else [])


def checkpoint_digest(checkpoint: Path, compvis_config: Path | None, cache_file: Path) -> str:
    """sha256 over the checkpoint's files; per-file hashes are cached by (path, size, mtime)
    so multi-GB checkpoints are read once."""
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    parts = []
    for f in checkpoint_files(checkpoint, compvis_config):
        st = f.stat()
        stamp = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if stamp not in cache:
            cache[stamp] = _file_sha256(f)
        parts.append((f.name, cache[stamp]))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(cache, indent=0))
    return sha256_json(parts)


def source_digest(paths: tuple[str, ...], root: Path = PROJECT_ROOT) -> str:
    """sha256 over the .py files under `paths` (relative to the project root)."""
    h = hashlib.sha256()
    for rel in paths:
        p = root / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "onnx", "onnxruntime"):
        versions[name] = importlib.import_module(name).__version__
    return versions


def read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


class RepositoryConflict(ValueError):
    """The repository was built from another checkpoint; rebuilding would replace it."""


def check_same_checkpoint(manifest: dict | None, checkpoint: Path, digest: str, out: Path,
                          replace: bool) -> None:
    """Refuse to rebuild `out` from a checkpoint other than the one it was built from."""
    built = (manifest or {}).get("checkpoint") or {}
    if not built.get("sha256") or built["sha256"] == digest or replace:
        return
    raise RepositoryConflict(
        f"{out} was built from {built.get('path')} (sha256 {built['sha256'][:12]}), not from "
        f"{checkpoint} (sha256 {digest[:12]}); rebuilding would replace it. Serve it as it is "
        "(--no-export), pick another --repository, or pass --replace to rebuild it.")


def check_out_dir(out: Path) -> None:
    """Refuse to replace a folder holding model folders this tool did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    if read_manifest(out) is None and any(p.is_dir() for p in out.iterdir()):
        raise FileExistsError(f"--out {out} holds folders but no {MANIFEST}: not written by "
                              "build_engines, refusing to replace it (pick another --out)")


def files_present(out: Path, manifest: dict) -> bool:
    prefix = manifest.get("name_prefix", "")  # of the networks' Triton model names
    return all((out / f"{prefix}{name}" / "1" / entry["file"]).is_file()
               for name, entry in manifest.get("models", {}).items())
