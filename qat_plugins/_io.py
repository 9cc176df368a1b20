"""Safe files: atomic writes (temporary file + one rename), stale temp-file cleanup, directory locks.

A crash leaves either the old file or the new one at ``path``, never half of one; temporary files carry
host and pid, so the next writer removes those of dead processes. Reasoning: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "remove_stale_temp_files", "DirectoryLock", "LockedError",
           "process_alive"]

LOCK_NAME = ".qat_plugins.lock"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _start_time(pid: int) -> str | None:
    """The kernel start time of ``pid`` (Linux ``/proc``), or None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """True while process ``pid`` of this host lives (and, with ``start``, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start is not None:
        now = _start_time(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def remove_stale_temp_files(directory: str | os.PathLike[str], *, unowned: bool = False) -> list[Path]:
    """Remove temporary files of :func:`atomic_path` left in ``directory`` by dead processes of this host.

    With ``unowned=True`` (the caller holds the directory's :class:`DirectoryLock`) older temp files
    without host/pid in their name (``.NAME.XXXX.tmp``) go too. Returns the removed paths.
    """
    removed: list[Path] = []
    d = Path(directory)
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    host = _host()
    for f in entries:
        if not (f.name.startswith(".") and f.name.endswith(".tmp")) or not f.is_file():
            continue
        m = _TMP_RE.match(f.name)
        if m is not None and m["host"] == host:
            stale = not process_alive(int(m["pid"]))
        else:
            stale = unowned and m is None
        if stale:
            with contextlib.suppress(OSError):
                f.unlink()
                removed.append(f)
    return removed


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    With ``overwrite=False`` an existing ``path`` is never replaced (``FileExistsError``). The temporary
    file is removed on any error.
    """
    p = Path(path)
    remove_stale_temp_files(p.parent if str(p.parent) else ".")
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.{_host()}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            yield Path(tmp)
        except OSError as e:  # name the file being written, not the temporary one (or none)
            if e.errno is not None and e.filename in (None, tmp, str(tmp)):
                raise type(e)(e.errno, e.strerror or str(e), str(p)) from None
            raise
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; give the file the usual permissions
        if overwrite:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)  # fails if p exists: no overwrite, still atomic
            except FileExistsError:
                raise FileExistsError(f"{p} already exists; not overwriting it") from None
            except OSError:  # file systems without hard links
                if p.exists():
                    raise FileExistsError(f"{p} already exists; not overwriting it") from None
                os.replace(tmp, p)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


class LockedError(FileExistsError):
    """The directory is locked by another live run."""


class DirectoryLock:
    """``with DirectoryLock(dir):`` -- exclusive use of an output directory by one live process.

    The lock file ``dir/.qat_plugins.lock`` is created with ``O_CREAT | O_EXCL`` (atomic) and holds
    pid, host, process start time and start date. A lock whose process is gone (same host) is stale
    and taken over; one of another host is honoured (its liveness cannot be checked from here).
    Released on exit, on errors and on Ctrl-C; a SIGKILLed holder leaves a stale lock.
    """

    def __init__(self, directory: str | os.PathLike[str], *, what: str = "run") -> None:
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self.token = f"{_host()}:{os.getpid()}:{time.time_ns()}"
        self.held = False

    def _payload(self) -> bytes:
        return (json.dumps({"pid": os.getpid(), "host": _host(), "pid_start": _start_time(os.getpid()),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": self.token}) + "\n").encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def acquire(self) -> "DirectoryLock":
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            try:
                os.write(fd, self._payload())
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held = True
            return self
        raise LockedError(f"cannot lock {self.path.parent}: the lock file {self.path} keeps changing; another "
                          f"{self.what} is starting there")

    def _take_over_if_stale(self) -> None:
        info = self._read()
        if info is None:  # being written right now, or left empty by a holder killed while writing it
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < 5.0:
                time.sleep(0.2)
                return
        elif info.get("host") != _host():
            raise LockedError(f"{self.path.parent} is in use by another {self.what} (pid {info.get('pid')} on host "
                              f"{info.get('host')}, started {info.get('started')}); wait for it, choose another "
                              f"output directory, or delete {self.path} if that run is dead")
        elif process_alive(int(info.get("pid", -1)), info.get("pid_start")):
            raise LockedError(f"{self.path.parent} is in use by another {self.what} (pid {info.get('pid')}, started "
                              f"{info.get('started')}); wait for it to finish or choose another output directory")
        # stale: remove it under a second O_EXCL file, re-checking that it is still the same stale lock,
        # so two runs taking over at once cannot delete each other's fresh lock
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        try:
            gfd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > 10.0:  # left by a process killed mid take-over
                    guard.unlink()
            time.sleep(0.1)
            return
        os.close(gfd)
        try:
            if self._read() == info:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = self._read()
        if info is not None and info.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
