"""The renderer: :mod:`pipeline.embed.rasterize` run in a child process per worker.

pdfium is not thread-safe and can crash or hang on hostile input, and a hung C call cannot
be interrupted from Python. :class:`Renderer` runs all decoding in one child interpreter,
with a timeout per page, and restarts it after a crash or a hang; the document then ends
as an error row (``RenderTimeout``, ``RendererCrashed``) and a fresh child takes the next.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import struct
import subprocess
import sys
from typing import Iterator

from pipeline.embed.rasterize import ErrorItem, PageItem, RenderSpec, iter_document

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- child process
# The child is a fresh interpreter (``python -m pipeline.embed.renderer``), not a fork or a
# multiprocessing spawn: forking a Ray worker with threads is unsafe, and spawn re-imports
# the parent's __main__ (Ray's worker script). Messages are length-prefixed pickles.

_HEADER = struct.Struct("!Q")


def _send(stream, obj) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _recv_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("renderer closed its output")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _child_main() -> None:
    """Render loop of the child process: one document at a time, items streamed back."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the message stream
    while True:
        header = inp.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        data, spec, skip = pickle.loads(inp.read(_HEADER.unpack(header)[0]))
        try:
            for item in iter_document(data, spec, skip):
                _send(out, item)
        except Exception as exc:  # a bug, not bad input: still an error row
            _send(out, ErrorItem(None, "render", type(exc).__name__, f"unexpected: {exc}"))
        _send(out, "done")


class Renderer:
    """Owns one rendering child process; restarts it after a crash or a timeout."""

    def __init__(self, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.embed.renderer"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=root,
        )

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        self._proc = None

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()

    def __del__(self):
        try:
            self._kill()
        except Exception:
            pass

    def _recv(self, deadline_s: float):
        fd = self._proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], deadline_s)
        if not ready:
            raise TimeoutError
        (n,) = _HEADER.unpack(_recv_exact(fd, _HEADER.size))
        return pickle.loads(_recv_exact(fd, n))

    def render(self, data: bytes, spec: RenderSpec, skip: frozenset = frozenset()) -> Iterator:
        """Items of ``iter_document``, run in the child; a hang or crash ends the document
        with an ErrorItem naming the page it stopped on."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        try:
            _send(self._proc.stdin, (data, spec, skip))
        except (BrokenPipeError, OSError):
            self._kill()
            self._start()
            _send(self._proc.stdin, (data, spec, skip))
        page = 0
        while True:
            try:
                item = self._recv(self.timeout_s)
            except TimeoutError:
                self._kill()
                yield ErrorItem(page + 1 if page else None, "render", "RenderTimeout",
                                f"no result within {self.timeout_s:g}s (--render-timeout-s) after page {page}; "
                                "the renderer was stopped and the rest of the document skipped")
                return
            except (EOFError, OSError, pickle.UnpicklingError):
                code = self._proc.poll() if self._proc else None
                self._kill()
                yield ErrorItem(page + 1 if page else None, "render", "RendererCrashed",
                                f"the renderer process died (exit code {code}) after page {page}; "
                                "the rest of the document was skipped")
                return
            if item == "done":
                return
            if isinstance(item, (PageItem, ErrorItem)) and item.page_number:
                page = item.page_number
            yield item


if __name__ == "__main__":
    # Run the loop from the imported module, so pickled items name pipeline.embed.rasterize
    # classes, not __main__ ones.
    from pipeline.embed.renderer import _child_main as child_main

    child_main()
