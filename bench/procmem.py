"""Memory of processes, read from /proc: a process's own fields, and the RSS of a whole served
set (the launcher, tritonserver and each Python-backend stub, named by its model)."""
from __future__ import annotations

from pathlib import Path


def status_bytes(pid: int | str, key: str) -> int:
    """A /proc/<pid>/status field in bytes (VmRSS, VmHWM), 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def process_rss(root: int) -> dict[str, int]:
    """{"name (pid)": RSS bytes} for `root` and its descendants (stubs named by model)."""
    out = {}
    for pid in descendants(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = Path(cmd[0].decode(errors="replace")).name
        if name == "triton_python_backend_stub" and len(cmd) > 1:
            name = "stub " + Path(cmd[1].decode(errors="replace")).parent.parent.name
        elif name in ("setpriv",):
            continue
        out[f"{name} ({pid})"] = status_bytes(pid, "VmRSS")
    return out
