"""Hygiene of the export cache (`build/export/{onnx,ort,engines}`) and of staged repositories.

- Every temporary folder is named `.tmp-<pid>-<name>-<random>`, so a later run can tell a
  folder left by a killed build (its pid is gone) from one a live build is filling, and
  removes only the former (`clean_stale_temps`).
- Each model keeps its newest `keep` builds; older ones are removed and logged
  (`evict_old_builds`). A Triton repository holds hard links to the files it serves, so
  evicting a cache entry never breaks a built repository.
- `mkdtemp` makes 0700 folders; they are opened up to what the umask allows, so a Triton
  that runs as another user can read the repository.
- A cache entry or a repository is filled in such a temporary folder and swapped in whole
  (`cache_entry`, `staged_directory`): a failure leaves the previous one untouched. A
  repository is a symbolic link to its folder, flipped atomically (`replace_dir`).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ldm.pretrained import current_umask

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
_TEMP_RE = re.compile(r"^\.tmp-(\d+)-")
DEFAULT_KEEP = 2


def make_temp_dir(parent: Path, name: str) -> Path:
    """A new temporary folder in `parent`, named for this process, readable per the umask."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{TEMP_PREFIX}{os.getpid()}-{name}-"))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove temporary folders in `folder` whose creating process is gone; the removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP_RE.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        size = _size(entry)
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        log.warning("removed %s (%.1f MB) left by an interrupted build (pid %s)", entry,
                    size / 1e6, m.group(1))
        removed.append(entry)
    return removed


def evict_old_builds(folder: Path, keep: int = DEFAULT_KEEP,
                     protect: tuple[Path, ...] = ()) -> list[Path]:
    """Keep the `keep` newest entries `<model>-<key>` per model in `folder` (and always those
    in `protect`, the ones this build uses); remove and log the rest."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if not folder.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    for entry in folder.iterdir():
        if entry.name.startswith(".") or "-" not in entry.name:
            continue
        groups.setdefault(entry.name.rsplit("-", 1)[0], []).append(entry)
    keep_paths = {p.resolve() for p in protect}
    removed = []
    for entries in groups.values():
        entries.sort(key=lambda p: (p.resolve() in keep_paths, p.stat().st_mtime), reverse=True)
        for old in entries[keep:]:
            if old.resolve() in keep_paths:
                continue
            size = _size(old)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
            log.info("export cache: removed %s (%.1f MB; keeping the newest %d per model)", old,
                     size / 1e6, keep)
            removed.append(old)
    return removed


# --- atomic replacement --------------------------------------------------------------------

HOME_SEP = "@"  # `out` links to its sibling `.<name>@<pid>-<random>`


def _home_pid(entry: Path, out: Path) -> int | None:
    """The pid in a sibling home folder's name `.<out>@<pid>-<random>`, else None."""
    prefix = f".{out.name}{HOME_SEP}"
    if not entry.name.startswith(prefix):
        return None
    pid = entry.name[len(prefix):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def clean_orphan_homes(out: Path) -> list[Path]:
    """Remove home folders beside `out` that it does not link to and whose creating process
    is gone: a build killed between moving its folder in and flipping the link, or the
    previous repository that the last swap kept."""
    if not out.parent.is_dir():
        return []
    current = out.resolve() if out.is_symlink() else None
    removed = []
    for entry in out.parent.iterdir():
        pid = _home_pid(entry, out)
        if pid is None or entry.resolve() == current or pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.warning("removed %s left by an interrupted build (pid %s)", entry, pid)
        removed.append(entry)
    return removed


def replace_dir(new: Path, out: Path) -> None:
    """Put folder `new` at `out` in one atomic step, portably: `out` is a symbolic link to a
    sibling folder, and the new folder's link is renamed over it with os.replace (rename(2)
    over a link is atomic on POSIX), so a reader sees the old repository or the new one,
    never a mix. The folder the old link pointed at is kept until the next swap (a reader or
    a running Triton that resolved it just before the flip still finds its files); older
    ones are deleted. A real folder at `out` (written before this layout) is moved aside
    first: that once, `out` is briefly absent."""
    home = Path(tempfile.mkdtemp(dir=out.parent,
                                 prefix=f".{out.name}{HOME_SEP}{os.getpid()}-"))
    home.chmod(0o777 & ~current_umask())
    os.replace(new, home)  # an empty folder may be replaced by rename(2)
    link = out.with_name(f"{TEMP_PREFIX}{os.getpid()}-{out.name}-link")
    os.symlink(home.name, link)  # relative: the pair may move together
    previous = out.resolve() if out.is_symlink() else None
    if previous is None and out.exists():
        previous = Path(tempfile.mkdtemp(dir=out.parent,
                                         prefix=f".{out.name}{HOME_SEP}{os.getpid()}-"))
        os.replace(out, previous)
    os.replace(link, out)
    keep = {home.resolve(), previous}
    for entry in out.parent.iterdir():
        if _home_pid(entry, out) is not None and entry.resolve() not in keep:
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` that replaces `out` when the block succeeds, and is
    deleted (leaving `out` as it was) when it raises."""
    tmp = make_temp_dir(out.parent, out.name)
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def cache_entry(folder: Path) -> Iterator[Path]:
    """A temporary folder beside `folder` to fill; it replaces `folder` when the block ends
    without error, so a cache entry is whole or absent, never half-written."""
    tmp = make_temp_dir(folder.parent, folder.name)
    try:
        yield tmp
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
