"""The renderer: :mod:`pipeline.embed.rasterize` run in child processes, one per document.

pdfium is not thread-safe, keeps process-wide state (its font mapper and glyph caches: a
font one document loads changes how the next one's non-embedded fonts render), and can
crash or hang on hostile input, and a hung C call cannot be interrupted from Python.

:class:`Renderer` therefore starts one long-lived child interpreter per worker (the
*zygote*: ``python -m pipeline.embed.renderer``, which imports pypdfium2, Pillow and numpy
once and never renders) and the zygote forks a fresh process for every document. Each
document sees the same pristine pdfium state, whatever ran before it, for the cost of a
``fork`` (about a millisecond; numbers in the report of the change) instead of an
interpreter start.

Limits, per document:

* **time** (``timeout_s``, ``--render-timeout-s``): the total time the caller spends waiting
  for the document's results, start-up included. Time the caller spends between items (for
  example a Ray generator held back by a slow downstream stage) does not count. On expiry
  the children are killed and the document ends with a ``RenderTimeout`` error row.
* **CPU priority** (``niceness``, default 10, or the environment variable
  ``PIPELINE_RENDER_NICENESS``; 0 = as the worker): the zygote and every per-document process
  run at this many nice levels below the Ray worker, so where renderers and a GPU actor share
  a node's cores, the actor's host work (model start-up, compile, building each batch's
  inputs) runs first and the GPU does not wait for pages it has already been sent.
* **memory** (``memory_limit_bytes``, default 8 GiB of address space, or the environment
  variable ``PIPELINE_RENDER_MEMORY_LIMIT_BYTES``; 0 = none): ``RLIMIT_AS`` of the
  per-document process, so a decompression bomb ends as an error row (``MemoryError``,
  a failed bitmap, or ``RendererCrashed``) instead of an OOM kill of the Ray worker.

Isolation: the child starts with an allow-listed environment (no cloud credentials), and
nothing crosses the pipe as pickle: every message is a fixed binary header, then raw RGB
bytes (a page) or a short UTF-8 JSON object (document info, an error). Every reply carries
the id of the request it answers, so a late reply can never be taken for another document.
A caller that stops iterating a document (``close()``, garbage collection) kills the
children; the next document starts a fresh zygote.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Iterator

import numpy as np

from pipeline.embed.rasterize import DocInfo, ErrorItem, PageItem, RenderSpec, iter_document

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT_BYTES = 8 << 30
MEMORY_LIMIT_ENV = "PIPELINE_RENDER_MEMORY_LIMIT_BYTES"
DEFAULT_NICENESS = 10
NICENESS_ENV = "PIPELINE_RENDER_NICENESS"

# The child's environment: only what an interpreter, pypdfium2 and Pillow need. Cloud
# credentials, tokens and the rest of the parent's environment stay out.
_ENV_KEEP = ("PATH", "PYTHONPATH", "PYTHONHOME", "HOME", "LANG", "LANGUAGE", "TMPDIR", "TMP", "TEMP",
             "LD_LIBRARY_PATH", "TZ")
_ENV_KEEP_PREFIXES = ("LC_",)

# ---------------------------------------------------------------- wire format
# Request (parent -> child): header, then a UTF-8 JSON object (spec, skip), then the file.
_REQ = struct.Struct("!QIQ")  # request id, JSON length, data length
# Reply (child -> parent): header, then the payload.
_REP = struct.Struct("!QBIIIQ")  # request id, kind, page number, height, width, payload length
K_START, K_INFO, K_PAGE, K_ERROR, K_DONE = 1, 2, 3, 4, 5
_MAX_JSON = 1 << 20  # a reply's JSON payload (document info, an error message) is short
_MAX_SIDE = 1 << 16


class _ProtocolError(Exception):
    pass


def _write_all(fd: int, *parts: bytes) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if not k:
            raise EOFError("renderer closed its output")
        got += k
    return bytes(buf)


def _reply(fd: int, rid: int, kind: int, page: int = 0, height: int = 0, width: int = 0,
           payload: bytes = b"") -> None:
    _write_all(fd, _REP.pack(rid, kind, page, height, width, memoryview(payload).nbytes), payload)


def _send_item(fd: int, rid: int, item) -> None:
    if isinstance(item, PageItem):
        img = np.ascontiguousarray(item.image, dtype=np.uint8)
        h, w, c = img.shape
        assert c == 3
        _reply(fd, rid, K_PAGE, item.page_number, h, w, img.data)
    elif isinstance(item, DocInfo):
        _reply(fd, rid, K_INFO, payload=json.dumps({"n_pages": int(item.n_pages)}).encode())
    elif isinstance(item, ErrorItem):
        body = {"page_number": item.page_number, "stage": item.stage, "error_type": item.error_type,
                "message": item.message[:100_000]}
        _reply(fd, rid, K_ERROR, payload=json.dumps(body).encode())
    else:
        raise TypeError(f"not a render item: {type(item).__name__}")


# ---------------------------------------------------------------- child processes
# The zygote is a fresh interpreter (``python -m pipeline.embed.renderer``), not a fork of the
# Ray worker: forking a process with threads is unsafe, and multiprocessing's spawn re-imports
# the parent's __main__. The zygote itself is single-threaded, so forking it is safe.


def _set_parent_death_signal() -> None:
    """Linux: die with SIGKILL when the parent process dies (best effort elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _render_one(out_fd: int, rid: int, req: dict, data: bytes, memory_limit: int) -> None:
    """Body of the per-document process: render, stream the items, exit without cleanup."""
    code = 0
    try:
        zygote = os.getppid()
        _set_parent_death_signal()
        if os.getppid() != zygote:  # the zygote died before the signal was armed
            os._exit(1)
        if memory_limit > 0:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        _reply(out_fd, rid, K_START, page=os.getpid())
        spec = RenderSpec(**req["spec"])
        try:
            for item in iter_document(data, spec, frozenset(req["skip"])):
                _send_item(out_fd, rid, item)
        except MemoryError as exc:
            _send_item(out_fd, rid, ErrorItem(None, "render", "MemoryError",
                                              f"over the renderer's memory limit ({memory_limit} bytes): {exc}"))
        except Exception as exc:  # a bug, not bad input: still an error row
            _send_item(out_fd, rid, ErrorItem(None, "render", type(exc).__name__, f"unexpected: {exc}"))
        import resource

        use = resource.getrusage(resource.RUSAGE_SELF)  # this process's own CPU: a forked child starts at zero
        _reply(out_fd, rid, K_DONE, payload=json.dumps({"cpu_s": use.ru_utime + use.ru_stime}).encode())
    except BaseException:
        code = 1
    finally:
        os._exit(code)  # no atexit (pypdfium2 would tear pdfium down), no flushing of inherited buffers


def _wait_child(pid: int, in_fd: int) -> int:
    """Wait for the per-document process; kill it and leave if the parent went away."""
    poller = select.poll()
    poller.register(in_fd, select.POLLHUP | select.POLLERR)
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)  # readable when the process exits: no polling delay
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        pass
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            for fd, ev in poller.poll(200 if pidfd is not None else 5):
                if fd == in_fd and ev & (select.POLLHUP | select.POLLERR):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    os._exit(0)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _warm_up() -> None:
    """What every document would otherwise pay again after the fork: imports, Pillow's plugin
    registry, one tiny image through the decode path. pdfium is initialized by the import but
    never used here, so each document starts from its pristine state."""
    import ctypes  # noqa: F401
    import gc
    import io
    import resource  # noqa: F401

    import pypdfium2  # noqa: F401
    from PIL import Image, ImageOps  # noqa: F401

    Image.init()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (255, 255, 255)).save(buf, format="PNG")
    for _ in iter_document(buf.getvalue(), RenderSpec(max_visual_tokens=4)):
        pass
    gc.collect()
    gc.freeze()  # fewer copy-on-write pages in each forked child


def _child_main() -> None:
    """Zygote loop: read a request, fork a process that renders it, wait, repeat."""
    in_fd, out_fd = sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno()
    sys.stdout = sys.stderr  # stray prints must not corrupt the message stream
    memory_limit = int(os.environ.get(MEMORY_LIMIT_ENV) or 0)
    niceness = int(os.environ.get(NICENESS_ENV) or 0)
    if niceness > 0:
        os.nice(niceness)  # inherited by every per-document process
    _warm_up()

    while True:
        try:
            rid, jlen, dlen = _REQ.unpack(_read_exact(in_fd, _REQ.size))
            req = json.loads(_read_exact(in_fd, jlen))
            data = _read_exact(in_fd, dlen)
        except EOFError:
            return
        pid = os.fork()
        if pid == 0:
            _render_one(out_fd, rid, req, data, memory_limit)
        del data, req
        status = _wait_child(pid, in_fd)
        if status != 0:
            # The document's process died without finishing (a crash in pdfium, the memory
            # limit): its last message may be cut short, so end the stream here, with its code.
            sys.stderr.flush()
            if os.WIFSIGNALED(status):
                signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
                os.kill(os.getpid(), os.WTERMSIG(status))
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


# ---------------------------------------------------------------- parent side


def child_environment(root: str, parent: dict | None = None) -> dict:
    """The child's environment: the allow-list from ``parent`` (default ``os.environ``), the
    package root on PYTHONPATH, one thread for numeric libraries."""
    parent = dict(os.environ if parent is None else parent)
    env = {k: v for k, v in parent.items() if k in _ENV_KEEP or k.startswith(_ENV_KEEP_PREFIXES)}
    env["PYTHONPATH"] = root + (os.pathsep + parent["PYTHONPATH"] if parent.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env.setdefault("PATH", os.defpath)
    return env


def _done_cpu_s(payload: bytes) -> float:
    """The CPU seconds a DONE reply reports (0.0 when absent or malformed)."""
    try:
        cpu = json.loads(payload.decode("utf-8")).get("cpu_s") if payload else None
    except (ValueError, AttributeError):
        return 0.0
    return float(cpu) if isinstance(cpu, (int, float)) and 0 <= cpu < 1e9 else 0.0


class Renderer:
    """Owns one zygote process, which forks a fresh renderer per document; restarts it after
    a crash, a timeout or an abandoned document."""

    def __init__(self, timeout_s: float = 60.0, memory_limit_bytes: int | None = None,
                 niceness: int | None = None):
        self.timeout_s = timeout_s
        if memory_limit_bytes is None:
            memory_limit_bytes = int(os.environ.get(MEMORY_LIMIT_ENV) or DEFAULT_MEMORY_LIMIT_BYTES)
        self.memory_limit_bytes = memory_limit_bytes
        if niceness is None:
            value = (os.environ.get(NICENESS_ENV) or "").strip()
            try:
                niceness = int(value) if value else DEFAULT_NICENESS
            except ValueError:
                raise ValueError(f"{NICENESS_ENV} must be an integer 0-19, got {value!r}") from None
        if not 0 <= niceness <= 19:
            raise ValueError(f"{NICENESS_ENV} / niceness must be 0-19, got {niceness}")
        self.niceness = niceness
        self._proc: subprocess.Popen | None = None
        self._proc_limit: int | None = None
        self._next_id = 1
        self.last_pid: int | None = None
        # CPU seconds that per-document processes reported for the documents they finished
        # (user + system, their own: a forked child starts at zero). A document cut short by
        # a timeout or a crash reports nothing.
        self.cpu_s = 0.0

    def _start(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = child_environment(root)
        env[MEMORY_LIMIT_ENV] = str(max(0, int(self.memory_limit_bytes or 0)))
        env[NICENESS_ENV] = str(self.niceness)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.embed.renderer"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=root, close_fds=True,
        )
        self._proc_limit = self.memory_limit_bytes

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()  # its per-document process follows (parent-death signal)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        self._proc = None

    def start(self) -> None:
        """Start the zygote now, not at the first document (a worker warmed up ahead of its
        first render task: :func:`pipeline.embed.flow.warm_render_worker`)."""
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()

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

    def _recv(self, wait_s: float):
        """One reply: (request id, kind, page, height, width, payload); TimeoutError when
        nothing starts arriving within ``wait_s``."""
        fd = self._proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, wait_s))
        if not ready:
            raise TimeoutError
        rid, kind, page, h, w, n = _REP.unpack(_read_exact(fd, _REP.size))
        if kind == K_PAGE:
            if not (0 < h <= _MAX_SIDE and 0 < w <= _MAX_SIDE and n == h * w * 3):
                raise _ProtocolError(f"bad page header {h}x{w}, {n} bytes")
        elif n > _MAX_JSON or kind not in (K_START, K_INFO, K_ERROR, K_DONE):
            raise _ProtocolError(f"bad reply kind {kind} with {n} bytes")
        return rid, kind, page, h, w, _read_exact(fd, n)

    @staticmethod
    def _decode(kind: int, page: int, h: int, w: int, payload: bytes):
        if kind == K_PAGE:
            return PageItem(page, np.frombuffer(payload, dtype=np.uint8).reshape(h, w, 3))
        body = json.loads(payload.decode("utf-8"))
        if not isinstance(body, dict):
            raise _ProtocolError("reply is not a JSON object")
        if kind == K_INFO:
            n_pages = body.get("n_pages")
            if type(n_pages) is not int:
                raise _ProtocolError("bad document info")
            return DocInfo(n_pages)
        number = body.get("page_number")
        fields = [body.get(k) for k in ("stage", "error_type", "message")]
        if not (number is None or type(number) is int) or not all(isinstance(f, str) for f in fields):
            raise _ProtocolError("bad error reply")
        return ErrorItem(number, *fields)

    def render(self, data: bytes, spec: RenderSpec, skip: frozenset = frozenset()) -> Iterator:
        """Items of ``iter_document``, rendered in a fresh process; a hang, a crash or the
        document's time running out ends it with an ErrorItem naming the page it stopped on.
        Stopping the iteration early kills the document's process."""
        rid = self._next_id
        self._next_id += 1
        if self._proc is not None and (self._proc.poll() is not None or self._proc_limit != self.memory_limit_bytes):
            self._kill()
        header = json.dumps({"spec": dataclasses.asdict(spec), "skip": sorted(int(p) for p in skip)}).encode()
        budget = self.timeout_s  # the document's time: what the caller spends waiting for it
        page, finished = 0, False
        try:
            for attempt in (0, 1):
                if self._proc is None:
                    self._start()
                try:
                    _write_all(self._proc.stdin.fileno(), _REQ.pack(rid, len(header), len(data)), header, data)
                    break
                except OSError:  # a zygote that died since its last document
                    self._kill()
                    if attempt:
                        raise
            while True:
                t0 = time.monotonic()
                try:
                    got, kind, number, h, w, payload = self._recv(budget)
                    budget -= time.monotonic() - t0
                    if got != rid:  # a late reply to an earlier request: never this document's
                        log.warning("renderer: dropped a reply to request %d while waiting for %d", got, rid)
                        continue
                    if kind == K_START:
                        self.last_pid = number  # the process rendering this document
                        continue
                    if kind == K_DONE:
                        finished = True
                        self.cpu_s += _done_cpu_s(payload)
                        return
                    item = self._decode(kind, number, h, w, payload)
                except TimeoutError:
                    self._kill()
                    yield ErrorItem(page + 1 if page else None, "render", "RenderTimeout",
                                    f"the document took over {self.timeout_s:g}s (--render-timeout-s, per document); "
                                    f"stopped after page {page}, the rest of the document was skipped")
                    return
                except (EOFError, OSError, ValueError, _ProtocolError) as exc:
                    code = self._proc.poll() if self._proc else None
                    if code is None and not isinstance(exc, (EOFError, OSError)):
                        code = f"none; bad message: {exc}"
                    elif code is None:
                        try:
                            code = self._proc.wait(1)
                        except subprocess.TimeoutExpired:
                            pass
                    self._kill()
                    limit = (f" (a memory limit of {self.memory_limit_bytes} bytes applies)"
                             if self.memory_limit_bytes else "")
                    yield ErrorItem(page + 1 if page else None, "render", "RendererCrashed",
                                    f"the renderer process died (exit code {code}) after page {page}{limit}; "
                                    "the rest of the document was skipped")
                    return
                if isinstance(item, (PageItem, ErrorItem)) and item.page_number:
                    page = item.page_number
                yield item
        finally:
            if not finished and self._proc is not None:
                self._kill()  # abandoned mid-document (or an error above): no child keeps working on it


if __name__ == "__main__":
    # Run the loop from the imported module, so the zygote's module is pipeline.embed.renderer.
    from pipeline.embed.renderer import _child_main as child_main

    child_main()
