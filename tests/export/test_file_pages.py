"""Pages of read-only weight files are given back after use; written copies never are."""
from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from export.file_pages import read_only_file_mappings, release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
SIZE = 64 << 20  # 64 MiB


def resident_file_bytes() -> int:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["RssFile"].split()[0]) * 1024


def test_read_pages_are_released_and_read_back_the_same(tmp_path):
    data = np.arange(SIZE // 4, dtype=np.float32)
    data.tofile(tmp_path / "weights.bin")
    mapped = np.memmap(tmp_path / "weights.bin", dtype=np.float32, mode="r")
    total = float(mapped.sum(dtype=np.float64))  # touches every page
    before = resident_file_bytes()
    assert [p for _, _, p in read_only_file_mappings([tmp_path])] == [
        str((tmp_path / "weights.bin").resolve())]
    assert release_file_pages([tmp_path]) == SIZE
    assert before - resident_file_bytes() >= SIZE * 0.9
    assert float(mapped.sum(dtype=np.float64)) == total  # the same bytes, read again
    assert release_file_pages([tmp_path / "elsewhere"]) == 0


def test_written_private_pages_are_never_released(tmp_path):
    (tmp_path / "w.bin").write_bytes(bytes(1 << 20))
    with open(tmp_path / "w.bin", "r+b") as f:
        copy = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, writable
    copy[:4] = b"edit"
    assert release_file_pages([tmp_path]) == 0
    assert copy[:4] == b"edit"  # madvise would have thrown the edit away
    copy.close()
