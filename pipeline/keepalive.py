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
    """Calls ``end()`` once, after ``seconds`` without a call (0: never)."""

    def __init__(self, seconds: float, end: Callable[[], None], what: str = "actor"):
        self.seconds = float(seconds)
        self._end = end
        self._what = what
        self.last_call = time.monotonic()
        self.in_call = 0  # calls running: never ended during one
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.start()

    def touch(self) -> None:
        """A call came (or a job took the actor over): the idle time starts again. A call that
        comes after the end was decided still fails (the caller starts a new actor)."""
        self.last_call = time.monotonic()

    def set(self, seconds: float) -> None:
        """The keep-alive of the job now served (each job sets its own)."""
        self.seconds = float(seconds)
        self.touch()
        self.start()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        with self._lock:
            self.in_call += 1
            self.touch()
        try:
            yield
        finally:
            with self._lock:
                self.in_call -= 1
                self.touch()

    def start(self) -> None:
        with self._lock:
            if self.seconds > 0 and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="keep-alive", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:  # decided with no call starting meanwhile
                idle = time.monotonic() - self.last_call
                if self.seconds <= 0 or (idle >= self.seconds and not self.in_call):
                    self._thread = None
                    ending = self.seconds > 0
                    break
            time.sleep(min(5.0, max(0.05, self.seconds - idle)))
        if ending:
            log.info("no call for %.0f s: this kept %s ends", self.seconds, self._what)
            self._end()
