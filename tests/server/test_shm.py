"""Shared memory of a killed Triton server is removed (server/shm.py, TritonServer.stop)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from server.shm import PREFIX, SHM_DIR, mapped_regions, remove_unmapped
from server.triton import TritonServer


@pytest.fixture(scope="module")
def triton_repo_for_shm(served_ldm_dir, tmp_path_factory):
    from tests.server.serving import build_served_repository, export_cache

    out = tmp_path_factory.mktemp("shm") / "model_repository"
    return build_served_repository(served_ldm_dir, out, export_cache(tmp_path_factory))


def ours() -> set:
    return set(SHM_DIR.glob(PREFIX + "*"))


def test_a_killed_servers_regions_are_removed(triton_repo_for_shm, tmp_path):
    server = TritonServer(triton_repo_for_shm, log_path=tmp_path / "triton.log").start()
    regions = mapped_regions([server.process.pid])
    assert regions, "the Python backend mapped no region (test premise)"
    os.kill(server.process.pid, signal.SIGKILL)  # a crash: Triton cannot clean up
    server.process.wait(10)
    # Left behind (the stubs, seeing their server gone, may remove their own; not the rest)...
    assert regions & ours()
    server.stop()
    assert not regions & ours()  # ...until stop() removed them


def test_only_unmapped_and_old_regions_are_swept(tmp_path):
    old, fresh = SHM_DIR / f"{PREFIX}test-old-{os.getpid()}", SHM_DIR / f"{PREFIX}test-new"
    for f in (old, fresh):
        f.write_bytes(b"\0" * 4096)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    try:
        removed = remove_unmapped(min_age=60)
        assert old in removed and not old.exists()
        assert fresh.exists()  # may belong to a server that is starting
    finally:
        for f in (old, fresh):
            f.unlink(missing_ok=True)
