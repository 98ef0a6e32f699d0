"""The export cache and the repository guard: interrupted builds cleaned, old builds evicted,
files readable by other users, a repository from another checkpoint never replaced silently."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from export.build_engines import main
from export.cache import clean_stale_temps, evict_old_builds, make_temp_dir

ROOT = Path(__file__).resolve().parents[2]


def build(ckpt: Path, root: Path, *extra: str) -> int:
    return main(["--checkpoint", str(ckpt), "--out", str(root / "repo"), "--work-dir",
                 str(root / "work"), "--models", "text_encoder", "--quiet", *extra])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_dead_builds_are_removed(tmp_path, caplog):
    stale = tmp_path / f".tmp-{dead_pid()}-unet-abc"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.onnx.data").write_bytes(b"\0" * 1000)
    mine = make_temp_dir(tmp_path, "text_encoder")
    alive = tmp_path / f".tmp-{os.getppid()}-vae-xyz"  # a live process's build
    alive.mkdir()
    keep = tmp_path / "unet-0123"
    keep.mkdir()
    with caplog.at_level(logging.WARNING, logger="export.cache"):
        assert clean_stale_temps(tmp_path) == [stale]
    assert "left by an interrupted build" in caplog.text
    assert mine.is_dir() and alive.is_dir() and keep.is_dir()


def test_a_killed_export_is_cleaned_by_the_next_run(tiny_ldm_dir, tmp_path):
    # Kill a real build mid-export: its temporary folders stay behind, the next run removes them.
    code = ("import os, signal, export.onnx_export as o\n"
            "real = o.export_onnx\n"
            "def die(*a, **k):\n"
            "    real(*a, **k)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "o.export_onnx = die\n"
            "import export.repository as r\n"
            "r.export_onnx = die\n"
            "from export.build_engines import main\n"
            f"main(['--checkpoint', {str(tiny_ldm_dir)!r}, '--out', {str(tmp_path / 'repo')!r},"
            f" '--work-dir', {str(tmp_path / 'work')!r}, '--models', 'text_encoder', '--quiet'])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300)
    assert r.returncode == -9
    left = list((tmp_path / "work" / "onnx").glob(".tmp-*"))
    assert left, "the killed build left no temporary folder (test premise)"
    assert build(tiny_ldm_dir, tmp_path) == 0
    assert not list((tmp_path / "work").rglob(".tmp-*"))
    assert not list(tmp_path.glob(".tmp-*"))


def test_old_builds_are_evicted_keeping_the_newest(tmp_path, caplog):
    for i, name in enumerate(["unet-a", "unet-b", "unet-c", "vae-a"]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    with caplog.at_level(logging.INFO, logger="export.cache"):
        # The protected entry (this build's) counts among the kept, however old.
        removed = evict_old_builds(tmp_path, keep=2, protect=(tmp_path / "unet-a",))
    assert sorted(p.name for p in removed) == ["unet-b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet-a", "unet-c", "vae-a"]
    assert "removed" in caplog.text and "unet-b" in caplog.text
    with pytest.raises(ValueError, match="keep must be >= 1"):
        evict_old_builds(tmp_path, keep=0)


def test_builds_keep_n_per_model_and_files_are_world_readable(tiny_ldm_dir, tmp_path):
    old = os.umask(0o022)
    try:
        for version in range(3):  # three checkpoints' builds (different content)
            ckpt = tmp_path / f"ckpt{version}"
            shutil.copytree(tiny_ldm_dir, ckpt)
            with open(ckpt / "config.yaml", "a") as f:
                f.write(f"\n# build {version}\n")
            assert build(ckpt, tmp_path, "--replace", "--keep-builds", "2") == 0
    finally:
        os.umask(old)
    entries = sorted(p.name for p in (tmp_path / "work" / "onnx").iterdir())
    assert len(entries) == 2 and all(e.startswith("text_encoder-") for e in entries)
    assert len(list((tmp_path / "work" / "ort").iterdir())) == 2
    for p in [tmp_path / "repo", *(tmp_path / "repo").rglob("*"),
              *(tmp_path / "work").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o004, f"{p} is not world-readable ({oct(mode)})"
        if p.is_dir():
            assert mode & 0o001, f"{p} is not world-searchable ({oct(mode)})"


def test_a_repository_from_another_checkpoint_is_not_replaced(tiny_ldm_dir, tmp_path, capsys):
    assert build(tiny_ldm_dir, tmp_path) == 0
    manifest = json.loads((tmp_path / "repo" / "manifest.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(tiny_ldm_dir, other)
    with open(other / "config.yaml", "a") as f:
        f.write("\n# another model\n")
    capsys.readouterr()
    assert build(other, tmp_path) == 1
    err = capsys.readouterr().err
    assert str(tiny_ldm_dir) in err and str(other) in err and "--replace" in err
    assert json.loads((tmp_path / "repo" / "manifest.json").read_text()) == manifest
    assert build(other, tmp_path, "--replace") == 0
    rebuilt = json.loads((tmp_path / "repo" / "manifest.json").read_text())
    assert rebuilt["checkpoint"]["path"] == str(other)
