"""The output folder of a job: what it may be, and who may write into it.

- ``check_folders(src, out)``: refused before any work: OUT == SRC (also through symlinks), SRC
  inside OUT, and a folder anywhere in OUT that links into SRC (outputs would land on source
  files). OUT inside SRC is allowed (the walk leaves it out).
- ``OutputLock``: one job at a time holds a folder's manifest (an exclusive ``flock`` on
  ``.rtkit/<manifest>.lock``; a second run is told who holds it). Every process that writes
  outputs (the main process, conversion processes, device workers) also holds a shared lock on
  ``.rtkit/<manifest>.writers``; a new run takes that one exclusively before it plans, so it
  starts only once every process of a killed run is gone and nothing of an older run can land
  after it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from rtkit.engines.errors import RtkitError


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_folders(src: str | Path, out: str | Path) -> None:
    """Refuse output folders that could overwrite or read back the sources."""
    src_r, out_r = _real(Path(src)), _real(Path(out))
    if src_r == out_r:
        raise RtkitError(f"OUT is the source folder ({out} -> {out_r}): outputs would overwrite the "
                         f"sources; choose another output folder")
    if _inside(src_r, out_r):
        raise RtkitError(f"the source folder {src} is inside OUT {out}: outputs could land on source "
                         f"files; choose an output folder outside the sources")
    # OUT inside SRC is allowed (the walk skips OUT). Either way no folder in OUT may be a link
    # into SRC: outputs written through it would overwrite source files. (A linked *file* is
    # safe: outputs replace the link itself, never its target.)
    if out_r.is_dir():
        for dirpath, dirnames, _ in os.walk(out_r, followlinks=False):
            for d in dirnames:
                link = Path(dirpath) / d
                if link.is_symlink() and _inside(_real(link), src_r) and not _inside(_real(link), out_r):
                    raise RtkitError(f"{link} in OUT links into the sources; outputs written through it "
                                     f"would overwrite source files")


class LockedError(RtkitError):
    """Another run holds the output folder."""


class OutputLock:
    """Exclusive hold of one manifest's output folder for the length of a run."""

    def __init__(self, manifest_file: str | Path, wait_writers_s: float = 120.0):
        self.path = Path(str(manifest_file) + ".lock")
        self.writers_path = Path(str(manifest_file) + ".writers")
        self.wait_writers_s = wait_writers_s
        self.fd: int | None = None
        self.writers_fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RtkitError(f"cannot write into the output folder {self.path.parent.parent}: "
                             f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockedError(f"{self.path.parent.parent} is being converted by another run "
                                  f"({self.holder()}); wait for it to finish or stop it") from None
            raise
        self.fd = fd
        try:  # who holds it, for the message a second run prints; the lock works without it
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        except OSError:
            pass
        self._wait_for_writers()
        return self

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
        except (OSError, ValueError):
            return "unknown process"

    def _wait_for_writers(self) -> None:
        """Exclusive on the writers lock = no process of an earlier run is alive; then keep it
        shared for our own writers."""
        try:
            fd = os.open(self.writers_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self.release()
            raise RtkitError(f"cannot write into the output folder {self.path.parent.parent}: "
                             f"{e.strerror or e}") from None
        deadline = time.monotonic() + self.wait_writers_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LockedError(f"processes of an earlier run still hold {self.writers_path}; "
                                      f"they did not exit within {self.wait_writers_s:.0f} s") from None
                time.sleep(0.02)
        fcntl.flock(fd, fcntl.LOCK_SH)  # downgrade: our workers take it shared too
        self.writers_fd = fd

    def release(self) -> None:
        for fd in (self.writers_fd, self.fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.writers_fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def exit_with(pid: int) -> None:
    """SIGKILL this process the moment process ``pid`` (the run's main process, on this machine)
    exits, even mid-batch: a watchdog thread waits on its pidfd (Linux; polling elsewhere).
    Fork-server children and Ray workers get no parent-death signal from the run, whose child
    they are not."""
    import signal
    import threading

    def watch():
        import select

        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGKILL)  # already gone
        except (AttributeError, OSError):
            while True:  # no pidfd: poll
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        else:
            select.select([fd], [], [])  # readable once the process has exited
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="run-watchdog").start()


def hold_writers_lock(writers_path: str | Path) -> int:
    """In a worker process: hold the run's writers lock (shared) until the process exits."""
    fd = os.open(writers_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd
