"""Shared-memory regions of Triton's Python backend, and removing the ones a dead server left.

Each Python-backend model instance talks to its stub through a POSIX shared-memory region,
`/dev/shm/triton_python_backend_shm_region_<uuid>` (up to tens of MB each). Triton removes
them when it stops cleanly; a killed or crashed server leaves them behind, and since /dev/shm
is RAM, every crash-restart would leak memory. A region that no live process maps is dead:
`TritonServer` removes its own server's regions when it stops and, before starting, any
unmapped region old enough not to belong to a server that is just starting.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "triton_python_backend_shm_region_"


def mapped_regions(pids: list[int] | None = None) -> set[Path]:
    """Regions mapped by `pids` (default: every process we can read)."""
    if pids is None:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[-1]
            if PREFIX in path:
                found.add(Path(path.removesuffix(" (deleted)")))
    return found


def remove_unmapped(candidates: set[Path] | None = None, min_age: float = 0.0) -> list[Path]:
    """Unlink the regions among `candidates` (default: all ours in /dev/shm) that no process
    maps and that are at least `min_age` seconds old; the removed ones."""
    if candidates is None:
        if not SHM_DIR.is_dir():
            return []
        candidates = {p for p in SHM_DIR.glob(PREFIX + "*") if p.stat().st_uid == os.getuid()}
    live = mapped_regions()
    removed = []
    now = time.time()
    for region in sorted(candidates - live):
        try:
            if now - region.stat().st_mtime < min_age:
                continue
            size = region.stat().st_size
            region.unlink()
        except FileNotFoundError:
            continue
        log.info("removed %s (%.1f MB) left by a stopped Triton server", region, size / 1e6)
        removed.append(region)
    return removed
