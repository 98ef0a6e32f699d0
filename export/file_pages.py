"""Give back the pages of weight files a runtime has finished reading (Linux).

OpenVINO maps its inputs (the ONNX external data, or the cached compiled blob) read-only and,
at bf16, reads the float32 weights once, on the first run of each shape, to pack them into
bf16 kernels of its own. The float32 pages stay mapped afterwards: the process's RSS shows the
weights twice (6 GB of mapped float32 pages beside 3 GB of bf16 for the paper's model), though
only the packed copy is used. `release_file_pages` unmaps them with madvise(MADV_DONTNEED):
nothing changes for the program (a read-only file mapping reads the same bytes again, from
the page cache or the disk, if it is ever touched), but the pages are no longer the process's,
and the kernel can drop them first when memory is short.
"""
from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MADV_DONTNEED = 4


def read_only_file_mappings(folders: Iterable[Path]) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's read-only file mappings under `folders`."""
    roots = [str(Path(f).resolve()) + "/" for f in folders]
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or "w" in parts[1]:  # never drop written (copied) pages
                continue
            path = parts[5].strip()
            if any(path.startswith(root) for root in roots):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                found.append((start, end, path))
    return found


def release_file_pages(folders: Iterable[Path]) -> int:
    """Unmap the resident pages of read-only file mappings under `folders`; the bytes
    covered (0 where the platform has no /proc/self/maps or madvise)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    total = 0
    for start, end, path in read_only_file_mappings(folders):
        if libc.madvise(start, end - start, MADV_DONTNEED) != 0:
            log.debug("madvise %s: errno %d", path, ctypes.get_errno())
            continue
        total += end - start
    return total
