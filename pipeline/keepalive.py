"""The idle timer of a kept actor (``--keep-scorers``, ``--keep-embedders``): no Ray, no torch.

A kept actor outlives its job so that the next job of the same settings skips its start
(imports, model load, compilation). It must not hold its GPU for ever: once it has had no
call for the time its last job set, it ends itself through the ``end`` it was given (in an
actor: Ray's kill, no restart). It never ends during a call, however long the call takes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

log = logging.getLogger(__name__)


class KeepAlive:
    """Calls ``end()`` once, after every keep-alive it was given has run out with no call
    (0: never).

    Each job sets its own keep-alive (:meth:`set`, and the ``seconds`` of its calls): the
    actor stays until the latest of ``last call of a job + that job's keep-alive``. A job
    that set 600 s is therefore not cut short by another job that set 60 s and called later
    (until 2026-12-04 the last job's setting won). Touches without a job of their own
    (``seconds`` None) count with the keep-alive set last."""

    def __init__(self, seconds: float, end: Callable[[], None], what: str = "actor"):
        self.seconds = float(seconds)  # the keep-alive set last
        self._end = end
        self._what = what
        self.last_call = time.monotonic()
        self.until = self.last_call + max(self.seconds, 0.0)  # monotonic: not before this
        self.in_call = 0  # calls running: never ended during one
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.start()

    def touch(self, seconds: float | None = None) -> None:
        """A call came (or a job took the actor over): this job's keep-alive (``seconds``;
        None: the one set last) counts from now. A call that comes after the end was decided
        still fails (the caller starts a new actor)."""
        now = time.monotonic()
        keep = self.seconds if seconds is None else float(seconds)
        with self._lock:
            self.last_call = now
            self.until = max(self.until, now + keep)

    def set(self, seconds: float) -> None:
        """The keep-alive of the job now served (each job sets its own)."""
        self.seconds = float(seconds)
        self.touch(seconds)
        self.start()

    @contextlib.contextmanager
    def call(self, seconds: float | None = None) -> Iterator[None]:
        """Around a call of a job whose keep-alive is ``seconds`` (None: the one set last)."""
        with self._lock:
            self.in_call += 1
        self.touch(seconds)
        try:
            yield
        finally:
            with self._lock:
                self.in_call -= 1
            self.touch(seconds)

    def start(self) -> None:
        with self._lock:
            if self.seconds > 0 and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="keep-alive", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:  # decided with no call starting meanwhile
                now = time.monotonic()
                left = self.until - now
                if self.seconds <= 0 or (left <= 0 and not self.in_call):
                    self._thread = None
                    ending = self.seconds > 0
                    idle = now - self.last_call
                    break
            time.sleep(min(5.0, max(0.05, left)))
        if ending:
            log.info("no call for %.0f s, the longest keep-alive of the jobs it served: this kept %s ends",
                     idle, self._what)
            self._end()
