"""A new node's blocks compiled in a helper process, while the actor loads its weights and runs
its first batches eagerly.

On a node that has never compiled this model (no precompiled blocks in this node's or the shared
``--compile-cache``), the actor's first batch compiled the vision block and the text layer with
the GPU idle: 8-11 s on an H200 after a 6-10 s model load, which kept a whole 3,000-page job on
such a node at 70-72% of the actor's rate (RESULTS.md, fourteenth and fifteenth sessions).
Compiling in a thread beside eager batches did not help: both need the GIL, and the eager
batches ran at ~12 pages/s instead of ~42 (eleventh session).

Here the actor starts, before it imports transformers, ``python -m pipeline.embed.compile_helper``:
a process that builds the same architecture with one vision block, one text layer and random
weights (:func:`pipeline.embed.model.load_model` with ``layers=1``: the blocks' compiled code
depends on their shapes and dtypes, not on the weights' values or the number of blocks), runs
two letter pages through the actor's own code path, so that each block type is compiled for the
calls a batch makes, and writes the compiled blocks (:func:`pipeline.embed.precompile.dumps`).
Meanwhile the actor loads its weights and, while the helper runs, runs each block eagerly
(:attr:`pipeline.embed.precompile.PrecompiledForward.defer`; the eager path is the training
code's, the compiled one within bf16 rounding of it). At each batch the actor checks whether the
helper has finished; then it loads the helper's blocks (and saves them under the model's own key
for the next actor). A helper that fails, times out, or whose blocks do not fit the real model's
calls costs nothing but CPU time: the actor compiles as before. On a warm node the helper is
stopped as soon as the precompiled blocks are loaded.

``$VDR_COMPILE_HELPER``: ``auto`` (the default: on for CUDA actors that compile with precompiled
blocks), ``1`` (also on CPU: tests), ``0`` (off: the first batch compiles, as before).
``$VDR_COMPILE_HELPER_TIMEOUT_S`` (default 600): after it the actor stops waiting and compiles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from pipeline.config import env_flag

log = logging.getLogger(__name__)

ENV = "VDR_COMPILE_HELPER"
TIMEOUT_ENV = "VDR_COMPILE_HELPER_TIMEOUT_S"
RESULT = "precompiled.bin"
# Two pages (a batch of one page compiles a variant of its own), a letter page at 768 visual
# tokens: the blocks are compiled with dynamic shapes, so other page sizes and batch sizes run
# the same variants.
PAGES = 2
PAGE_SHAPE = (896, 672)


def wanted(device: str, compile_model: bool, precompiled: bool | None) -> bool:
    """Whether an actor with these settings starts a helper (``$VDR_COMPILE_HELPER``)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: use auto (the default: on for CUDA actors), 1 or 0")
    if value == "0" or not compile_model or precompiled is False:
        return False
    if precompiled is None and not env_flag("VDR_PRECOMPILE", True):
        return False
    return value == "1" or str(device).startswith("cuda")


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "600")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: give the seconds the actor waits for its compile helper (> 0)")
    return value


class CompileHelper:
    """The actor's handle on its helper process. :meth:`pending` is the blocks' ``defer`` hook;
    :meth:`collect` loads the helper's blocks once it has finished."""

    def __init__(self, model: str, device: str, dtype: str = "auto", attn_implementation: str | None = None,
                 precision: str = "default", endpoint_url: str | None = None, command: list[str] | None = None):
        self.timeout_s = timeout_s()
        self.dir = tempfile.mkdtemp(prefix="vdr-compile-helper-")
        args = {"model": model, "device": device, "dtype": dtype, "attn_implementation": attn_implementation,
                "precision": precision, "endpoint_url": endpoint_url, "out": os.path.join(self.dir, RESULT)}
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.log_path = os.path.join(self.dir, "helper.log")
        self.started = time.monotonic()
        self.started_wall = time.time()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(command or [sys.executable, "-m", "pipeline.embed.compile_helper",
                                                     json.dumps(args)],
                                         env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.state = "running"  # then: loaded, failed (...), timed out, stopped (...)
        self.ready_s: float | None = None  # seconds from the start to its blocks loaded
        self.variants = 0
        self.note: str | None = None
        self.eager_batches = 0  # counted by the actor: batches with blocks run eagerly while it ran
        self._lock = threading.Lock()

    def pending(self) -> bool:
        return self.state == "running"

    def collect(self, forwards: list) -> int | None:
        """If the helper has ended: load its blocks into ``forwards`` (once) and return the
        variants loaded (0 when it failed); None while it still runs."""
        if self.state != "running":
            return None
        if self.proc.poll() is None:
            if time.monotonic() - self.started <= self.timeout_s:
                return None
            self.stop(f"timed out after {self.timeout_s:g} s")
            log.warning("compile helper: no compiled blocks after %g s (%s); compiling here",
                        self.timeout_s, TIMEOUT_ENV)
            return 0
        from pipeline.embed import precompile

        with self._lock:
            if self.state != "running":
                return None
            path = os.path.join(self.dir, RESULT)
            if self.proc.returncode != 0 or not os.path.exists(path):
                self.state = f"failed (exit {self.proc.returncode}): {self._last_line()}"
                log.warning("compile helper %s; the blocks are compiled here. The end of its log:\n%s",
                            self.state, self._tail())
                shutil.rmtree(self.dir, ignore_errors=True)
                return 0
            try:
                with open(path, "rb") as f:
                    n = precompile.loads(f.read(), forwards)
            except Exception as exc:  # noqa: BLE001 - unusable blocks: compile here
                self.state = f"failed: its blocks could not be loaded ({type(exc).__name__})"
                log.warning("compile helper %s; the blocks are compiled here", self.state)
                return 0
            self.variants = n
            self.note = self._last_line()  # its own timings: model built in .. s, compiled in .. s
            # when its blocks were written (the actor looks at its next batch)
            self.ready_s = round(os.path.getmtime(path) - self.started_wall, 3)
            self.state = "loaded"
            log.info("compile helper: %d compiled block variants loaded, %.1f s after it started", n, self.ready_s)
            shutil.rmtree(self.dir, ignore_errors=True)
            return n

    def stop(self, reason: str = "stopped") -> None:
        """End the helper (a warm node needs none; the actor is going away)."""
        with self._lock:
            if self.proc.poll() is None:
                self.proc.kill()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            if self.state == "running":
                self.state = reason
            shutil.rmtree(self.dir, ignore_errors=True)

    def summary(self, forwards: list) -> dict:
        return {"state": self.state, "ready_s": self.ready_s, "variants": self.variants, "note": self.note,
                "eager_batches": self.eager_batches, "eager_calls": {pf.name: pf.eager_calls for pf in forwards}}

    def _lines(self) -> list[str] | None:
        try:
            with open(self.log_path, "rb") as f:
                return [ln for ln in f.read()[-8000:].decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return None

    def _last_line(self) -> str:
        lines = self._lines()
        if lines is None:
            return "no log"
        return lines[-1][:300] if lines else "no output"

    def _tail(self, n: int = 20) -> str:
        return "\n".join((self._lines() or [])[-n:])

    def __del__(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    """The helper process: compile every block type on a one-block random-weights model and
    write the compiled blocks to ``out`` (whole: written aside, then renamed)."""
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s compile helper %(message)s")
    parent = os.getppid()

    def end_with_parent() -> None:  # an actor killed by Ray leaves no helper compiling behind
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(4)

    threading.Thread(target=end_with_parent, daemon=True).start()
    t = time.perf_counter()
    import numpy as np
    import torch

    from pipeline.embed import precompile
    from pipeline.embed.model import embed_pages, load_model

    lm = load_model(args["model"], device=args["device"], dtype=args["dtype"],
                    attn_implementation=args["attn_implementation"], endpoint_url=args["endpoint_url"],
                    compile_model=True, precision=args["precision"], precompiled=True, layers=1)
    loaded = time.perf_counter() - t
    if not lm.precompiled or all(pf.fallback is not None for pf in lm.precompiled):
        print("no block can be compiled ahead of time here (see the warnings above)", flush=True)
        return 3
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*PAGE_SHAPE, 3), dtype=np.uint8) for _ in range(PAGES)]
    embed_pages(lm, images, out_dtype=torch.float16)
    compiled = time.perf_counter() - t - loaded
    data = precompile.dumps(lm.precompiled)
    tmp = args["out"] + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args["out"])
    print(f"compiled {sum(len(pf.variants) for pf in lm.precompiled)} block variants: model built in {loaded:.1f} s, "
          f"compiled in {compiled:.1f} s, {len(data)} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
