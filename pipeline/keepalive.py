"""The idle timer of a kept actor (``--keep-scorers``, ``--keep-embedders``): no Ray, no torch.

A kept actor outlives its job so that the next job of the same settings skips its start
(imports, model load, compilation). It must not hold its GPU for ever: once it has had no
call for the keep-alive its jobs set (each job's own, from that job's last call; see
:class:`KeepAlive`), it ends itself through the ``end`` it was given (in an actor: Ray's kill,
no restart). It never ends during a call, however long the call takes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

log = logging.getLogger(__name__)


class KeepAlive:
    """Calls ``end()`` once, after the keep-alive of each job it serves has run out with no
    call from that job (0: never).

    Each job names itself (``job``) in its calls and pings and sets its own keep-alive
    (:meth:`set`), counted from its own last call. Jobs one after another: a job last heard
    of before the newest job first called is done, and no longer counts, so the later job's
    keep-alive applies. Jobs at the same time: each one's counts, so a job that set 600 s is
    not cut short by another that set 60 s and ended first. Touches that name no job count
    with the keep-alive set last."""

    JOBS_REMEMBERED = 64

    def __init__(self, seconds: float, end: Callable[[], None], what: str = "actor"):
        self.seconds = float(seconds)  # the keep-alive set last
        self._end = end
        self._what = what
        self.last_call = time.monotonic()
        self.in_call = 0  # calls running: never ended during one
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # job -> (its last call, its keep-alive); jobs heard of before the newest job's first
        # call (``_newest``) are done
        self._jobs: collections.OrderedDict = collections.OrderedDict({None: (self.last_call, self.seconds)})
        self._newest = self.last_call
        self.start()

    def touch(self, job: str | None = None, seconds: float | None = None) -> None:
        """A call or a ping came from ``job`` (None: unnamed), whose keep-alive is ``seconds``
        (None: as before, or the one set last): its idle time starts again. A call that comes
        after the end was decided still fails (the caller starts a new actor)."""
        now = time.monotonic()
        with self._lock:
            self.last_call = now
            known = self._jobs.pop(job, None)
            if known is None and job is not None:
                self._newest = now  # a job's first call
            keep = float(seconds) if seconds is not None else (known[1] if known else self.seconds)
            self._jobs[job] = (now, keep)
            while len(self._jobs) > self.JOBS_REMEMBERED:
                self._jobs.popitem(last=False)

    def set(self, seconds: float, job: str | None = None) -> None:
        """The keep-alive of ``job``, the job now served (each job sets its own)."""
        self.seconds = float(seconds)
        self.touch(job, seconds)
        self.start()

    @contextlib.contextmanager
    def call(self, job: str | None = None, seconds: float | None = None) -> Iterator[None]:
        """Around a call of ``job`` (its keep-alive ``seconds``; None: as before)."""
        with self._lock:
            self.in_call += 1
        self.touch(job, seconds)
        try:
            yield
        finally:
            with self._lock:
                self.in_call -= 1
            self.touch(job, seconds)

    def _until(self) -> float:
        """When it may end (``time.monotonic()``, under the lock): the latest of each current
        job's last call plus its keep-alive."""
        return max((last + keep for last, keep in self._jobs.values() if last >= self._newest),
                   default=self.last_call + self.seconds)

    def start(self) -> None:
        with self._lock:
            if self.seconds > 0 and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="keep-alive", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:  # decided with no call starting meanwhile
                now = time.monotonic()
                left = self._until() - now
                if self.seconds <= 0 or (left <= 0 and not self.in_call):
                    self._thread = None
                    ending = self.seconds > 0
                    idle = now - self.last_call
                    break
            time.sleep(min(0.5, max(0.05, left)))  # a later job may shorten ``left``
        if ending:
            log.info("no call for %.0f s, past the keep-alive of every job it served: this kept %s ends",
                     idle, self._what)
            self._end()
