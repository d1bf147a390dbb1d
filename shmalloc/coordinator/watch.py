"""The process watch: how the coordinator finds the processes that ended and reclaims their memory.

Whether a slot's process runs is its life lock's answer (native/life.c, read each tick without a
lock): held, it runs, in whatever PID namespace; owner-died, it has ended. A pid only helps to be
woken at once: each LIVE slot whose process this coordinator can see gets a pidfd
(``pidfd_open``), and the loop sleeps in ``poll()`` on them and on its self-pipe (signals,
``stop()``), so a death wakes it at once instead of at the next tick. The slot's start time is
compared with /proc right after opening, so a recycled pid is never watched in place of the
process that held the slot; a process whose life lock is held but whose pid shows another process
(or none) runs in another PID namespace (another container sharing /dev/shm): it is not watched,
and its life lock, read every tick, tells when it ends. Only a slot whose life lock nobody holds
(its process closed the arena while owning blocks) is judged from /proc. Either way the
collection itself (``GlobalGarbageCollector.reclaim_dead``) decides again, from the life lock,
which slots are dead before anything is freed.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from typing import Any

from .. import _binding as C
from .. import process
from ..gc import GlobalGarbageCollector
from ..tracking import scan_slots as scan

__all__ = ["ProcessWatch"]

logger = logging.getLogger("shmalloc.coordinator")  # one logger for every part of the coordinator

_Key = tuple[int, int]  # (pid, start time): a process, never a recycled pid


class ProcessWatch:
    """The slots of the arena handle ``h``, watched through pidfds registered with ``poller``.

    ``rows`` is the process table as the last scan read it; ``exited`` the LIVE slots whose
    process was seen ending (from then on /proc decides about them)."""

    def __init__(self, h: Any, gc: GlobalGarbageCollector, poller: select.poll) -> None:
        self._h, self._gc, self._poller = h, gc, poller
        self._watch: dict[int, _Key] = {}  # pidfd -> (pid, start time)
        self._watched: dict[_Key, int] = {}  # (pid, start time) -> pidfd
        self.exited: set[_Key] = set()
        self._pidfd_ok = hasattr(os, "pidfd_open")
        self.rows: list[Any] = []
        self._tried: set[_Key] = set()  # DEAD slots left after the last reclaim
        self._retry_at = 0.0
        # running (life lock held) but not watched through a pidfd: its pid shows another process
        # or none (another PID namespace), or pidfds are not available; its life lock is read
        self.foreign: set[_Key] = set()

    def owns(self, fd: int) -> bool:
        """Whether ``fd`` (ready in the poller) is the pidfd of a watched process."""
        return fd in self._watch

    def ended(self, fd: int) -> None:
        """The process of the pidfd ``fd`` ended: stop watching it, remember it as exited."""
        self.exited.add(self._unwatch(fd))

    def scan(self) -> None:
        """Watch the LIVE slots, drop watches of slots that went, and reclaim if a process ended.

        A DEAD slot that a reclaim left behind (a live process retains one of its blocks) is
        tried again once a second, not every tick."""
        rows = self.rows = scan(self._h)
        live = set()
        ended = False
        for r in rows:
            key = (r.pid, r.start_time)
            if r.state == C.PROC_DEAD:
                if key not in self._tried or time.monotonic() >= self._retry_at:
                    ended = True
                continue
            live.add(key)
            life = C.proc_life(self._h, r.slot)
            if life == C.LIFE_DEAD:  # its holder died: ended, whatever its pid shows now
                ended = True
                continue
            if key in self._watched:
                continue
            if life == C.LIFE_HELD:  # it runs; watch its pid only if it is the same process
                if key not in self.foreign and (not self._pidfd_ok or not self._open_watch(key)):
                    self.foreign.add(key)
                continue
            if key in self.exited or not self._pidfd_ok:
                if not process.is_alive(*key):
                    ended = True
                continue
            if not self._open_watch(key):
                ended = True
        for key in [k for k in self._watched if k not in live]:
            self._unwatch(self._watched[key])
        self.exited &= live
        self.foreign &= live
        if ended:
            self.reclaim()

    def reclaim(self) -> None:
        """Reclaim the memory of every process that has ended, and read the table again."""
        stats = self._gc.reclaim_dead()
        for pid, nbytes in stats.reclaimed:
            logger.info("reclaimed %d bytes of process %d, which has ended", nbytes, pid)
        self.rows = scan(self._h)
        self._tried = {(r.pid, r.start_time) for r in self.rows if r.state == C.PROC_DEAD}
        self._retry_at = time.monotonic() + 1.0

    def close(self) -> None:
        """Close every pidfd."""
        for fd in list(self._watch):
            self._unwatch(fd)

    def _open_watch(self, key: _Key) -> bool:
        """Watch (pid, start time) with a pidfd; False if that process has already ended."""
        try:
            fd = os.pidfd_open(key[0])
        except ProcessLookupError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                logger.info("pidfds are not available (%s): asking /proc every tick", e)
                self._pidfd_ok = False
            else:  # EMFILE and such: ask /proc for this one
                self.exited.add(key)
            return process.is_alive(*key)
        if process.start_time(key[0]) != key[1]:
            os.close(fd)  # the pid now names another process: the slot's one has ended
            return False
        self._watch[fd] = key
        self._watched[key] = fd
        self._poller.register(fd, select.POLLIN)
        return True

    def _unwatch(self, fd: int) -> _Key:
        key = self._watch.pop(fd)
        del self._watched[key]
        self._poller.unregister(fd)
        os.close(fd)
        return key
