"""Files that are never half-written and folders owned by one process at a time.

Every file a run or a command leaves behind (checkpoints, ``metrics.jsonl``, ``result.json``, splits,
leaderboards, plots) goes through :func:`atomic_write`: a uniquely named temporary file in the same folder,
then ``os.replace``, so a reader sees the old file or the new one, never a prefix of it, and two writers of
one file never share a temporary name. A run folder is owned through :class:`RunLock` (``fcntl.flock`` on a
lock file holding the owner's pid; the kernel releases it when the process ends, however it ends).

Failures of the machine (disk full, read-only folder) become :class:`~osslbench.errors.HostError`: one line
naming the file, exit status 3.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from .errors import ConfigError, HostError, OsslbenchError

LOCK = ".lock"
_TMP_SUFFIX = ".tmp"


def _temp_in(folder: Path, name: str) -> Path:
    """A new empty file with a unique name in ``folder`` (same file system as the target: rename is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    return Path(tmp)


def host_error(path: Path, exc: BaseException, doing: str = "write") -> HostError:
    """A one-line :class:`HostError` for an OS-level failure on ``path`` (says how much space is left when the
    disk is full)."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code is not None:
        why = os.strerror(code)
    else:  # torch.save reports a full disk as a RuntimeError from its zip writer (inline_container.cc)
        why = "the write failed"
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        if code == errno.ENOSPC or free < 64 * 2**20:
            why += f" ({free / 2**20:.0f} MiB free on that disk)"
    hint = {errno.EROFS: "choose a writable --out", errno.EACCES: "check its permissions or choose another --out",
            errno.ENOSPC: "free some space or choose another --out"}.get(code or 0, "check the disk and the folder")
    return HostError(f"cannot {doing} {path}: {why}; {hint}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a unique temporary file beside ``path``, then rename it over ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was; OS failures (and torch's
    zip-writer failures) become a :class:`HostError` naming ``path``.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_in(path.parent, path.name)
        write(tmp)
        os.replace(tmp, path)
        tmp = None
    except OsslbenchError:
        raise
    except OSError as exc:
        raise host_error(path, exc) from None
    except RuntimeError as exc:
        if "inline_container" in str(exc) or "PytorchStreamWriter" in str(exc) or "file write failed" in str(exc):
            raise host_error(path, exc) from None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files left in ``folder`` by a process that was killed mid-write (call it only while
    owning the folder: another owner's temporary files would be live)."""
    for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def clear_folder(folder: Path) -> None:
    """Delete everything in ``folder`` but its lock file (``--overwrite`` of a folder one owns)."""
    for entry in Path(folder).iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be one (a file on the way: :class:`ConfigError`) or cannot be written
    (read-only, no permission: :class:`HostError`), before anything is trained. Writes nothing that stays."""
    out = Path(out)
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{flag} {out}: {probe} is a file, not a folder")
    try:
        _temp_in(probe, "osslbench-probe").unlink()
    except OSError as exc:
        raise host_error(out, exc, "write into") from None


class RunLock:
    """Own ``folder`` (a run folder) for the duration of a ``with`` block.

    The lock is ``flock`` on ``<folder>/.lock``, which holds the owner's pid (for the message another process
    prints). ``wait=True`` waits for the owner (one line on stderr says so), ``wait=False`` raises
    :class:`RunLockedError`. On release the lock file is removed, and ``folder`` too when nothing else is in it
    (a run that failed before writing anything leaves nothing). With ``own_temporaries`` (a run folder, where
    every writer holds the lock) stale temporary files of a killed owner are removed once the lock is held.
    """

    def __init__(self, folder: Path, wait: bool = True, poll_s: float = 0.2, own_temporaries: bool = True) -> None:
        self.folder, self.wait, self.poll_s, self.own_temporaries = Path(folder), wait, poll_s, own_temporaries
        self.fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid else "another process"

    def acquire(self) -> RunLock:
        told = False
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise host_error(self.path, exc, "create") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if not self.wait:
                    raise RunLockedError(f"{self.folder} is in use by {self._holder()}; wait for it to finish or use "
                                         "another --out") from None
                if not told:
                    print(f"osslbench: {self.folder} is in use by {self._holder()}; waiting for it", file=sys.stderr)
                    told = True
                time.sleep(self.poll_s)
                continue
            # the previous owner may have removed the lock file between our open and our flock: then we hold a
            # lock on a file nobody else can see; start again on the file at the path
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            if self.own_temporaries:
                remove_stale_temporaries(self.folder)
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding the lock: a waiter then re-checks the path (see acquire)
        os.close(self.fd)
        self.fd = None
        with contextlib.suppress(OSError):
            self.folder.rmdir()  # only succeeds when empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class RunLockedError(OsslbenchError):
    """A run folder is owned by another process (and the caller chose not to wait)."""
