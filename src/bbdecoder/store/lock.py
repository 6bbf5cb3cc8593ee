"""Single-writer ownership of a run store: an ``flock`` on ``<store>.lock`` next to the store
(the file exists while a writer holds the store; a killed writer leaves it behind, unlocked).

The operating system releases an ``flock`` when its holder dies (also on SIGKILL), so a crashed
run never keeps the store locked. The holder writes who it is (pid, host, start time, command)
into the lock file, so a refused writer can say who holds the store. A second writer in the
same process (a notebook cell run again while the previous Analyzer is still open) is refused
as well: every ``open`` of the lock file is its own ``flock`` owner.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path
from typing import IO, Any

from bbdecoder.store.schema import StoreError, StoreLockedError

LOCK_SUFFIX = ".lock"

_held: weakref.WeakSet[StoreLock] = weakref.WeakSet()


def lock_path(db: Path) -> Path:
    """The lock file of the store file ``db`` (``run.sqlite`` -> ``run.sqlite.lock``)."""
    return db.with_name(db.name + LOCK_SUFFIX)


class StoreLock:
    """An exclusive, non-blocking ``flock`` on the store's lock file, taken at construction.

    Raises :class:`StoreLockedError` naming the holder when another writer (another process, or
    another open writer in this process) holds it, :class:`StoreError` when the lock file cannot
    be created (read-only folder, full disk).
    """

    def __init__(self, db: Path) -> None:
        self.path = lock_path(db)
        handle = self._acquire(db)
        self._handle: IO[str] | None = handle
        self.holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:300],
        }
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(self.holder))
            handle.flush()
        except OSError as err:
            self.release()
            raise StoreError(
                f"cannot write the lock file {self.path} of the run store {db}: {err}{hint(err)}"
            ) from err
        _held.add(self)

    def _acquire(self, db: Path) -> IO[str]:
        # The file is removed at release, so a lock taken on a file that was meanwhile unlinked (and
        # perhaps recreated by a third writer) is not the store's lock: check the inode, try again.
        for _ in range(100):
            try:
                handle: IO[str] = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
            except OSError as err:
                raise StoreError(
                    f"cannot create the lock file {self.path} of the run store {db}: {err}{hint(err)}"
                ) from err
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(handle)
                handle.close()
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreLockedError(_locked_message(db, holder)) from None
                raise StoreError(f"cannot lock the run store {db} ({self.path}): {err}") from err
            try:
                mine, named = os.fstat(handle.fileno()), os.stat(self.path)
                if (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino):
                    return handle
            except OSError:
                pass
            handle.close()
        raise StoreError(f"cannot lock the run store {db}: its lock file {self.path} keeps being replaced")

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Give the store up and remove the lock file (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)  # while still holding the lock (see _acquire)
        with contextlib.suppress(OSError):
            handle.close()  # closing the last descriptor releases the flock

    def _forget_after_fork(self) -> None:
        # A forked child (e.g. a DataLoader worker) shares the flock of its parent's descriptor; closing
        # the child's copy (never LOCK_UN, which would unlock the parent) lets the lock die with the parent.
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()


def _after_fork_in_child() -> None:
    for lock in list(_held):
        lock._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def hint(err: OSError) -> str:
    """The fix for a failed write, for messages."""
    if err.errno == errno.ENOSPC:
        return "; free disk space or pass a save_path on another disk"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "; the folder is not writable: pass a save_path in a writable folder (reading needs none)"
    return ""


def _read_holder(handle: IO[str]) -> dict[str, Any]:
    try:
        handle.seek(0)
        record = json.loads(handle.read() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _locked_message(db: Path, holder: dict[str, Any]) -> str:
    pid, host, since = holder.get("pid"), holder.get("host"), holder.get("since", "an unknown time")
    if pid == os.getpid() and host == socket.gethostname():
        who = (
            f"this process (pid {pid}) since {since}: an Analyzer or RunWriter on this save_path is "
            "still open (e.g. from a notebook cell run before)"
        )
        fix = "call .close() on the previous Analyzer (or restart the kernel), or pass another save_path"
    elif pid is not None:
        command = f" ({holder['command']})" if holder.get("command") else ""
        who = f"pid {pid} on host {host} since {since}{command}"
        fix = "wait for that run to finish or stop it, or pass another save_path"
    else:
        who = "another writer (its record is not readable)"
        fix = "wait for that run to finish or stop it, or pass another save_path"
    return (
        f"the run store {db} is already being written by {who}. A store has one writer at a time: "
        f"{fix}. Reading it (open_run, bbdecoder report) needs no lock."
    )
