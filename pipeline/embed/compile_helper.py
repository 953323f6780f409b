"""A new node's blocks compiled in a helper process, while the actor loads its weights and runs
its first batches eagerly (opt-in: ``VDR_COMPILE_HELPER=1``).

On a node that has never compiled this model (no precompiled blocks in this node's or the shared
``--compile-cache``), the actor's first batch compiles the vision block and the text layer with
the GPU idle: 8-11 s on an H200 after a 6-10 s model load, which keeps a whole 3,000-page job on
such a node at 65-72% of the actor's rate (RESULTS.md, fourteenth, fifteenth and eighteenth
sessions). Compiling in a thread beside eager batches did not help: both need the GIL, and the
eager batches ran at ~12 pages/s instead of ~42 (eleventh session).

With the helper, the actor starts, before it imports transformers, ``python -m
pipeline.embed.compile_helper``: a process that builds the same architecture with one vision
block, one text layer and random weights (:func:`pipeline.embed.model.load_model` with
``layers=1``: the blocks' compiled code depends on their shapes and dtypes, not on the weights'
values or the number of blocks). It waits for the actor's first batch to learn the page shapes
and the batch size (so Inductor compiles with the size hints the actor's own first batch would
have given it), runs random pages of those shapes through the actor's code path, so that each
block type is compiled for the calls a batch makes, writes the compiled blocks
(:func:`pipeline.embed.precompile.dumps`) for the actor, and saves them under the model's key in
this node's compile cache and ``--compile-cache`` (outside Ray an actor that ends first lets its
helper finish and save; a Ray worker's child processes end with it, so under Ray a job that ends
before the helper has compiled leaves the node without blocks, and its next actor starts a helper
again). Meanwhile the actor loads its weights and runs each block eagerly
(:attr:`pipeline.embed.precompile.PrecompiledForward.defer`; the eager path is the training
code's, the compiled one within bf16 rounding of it); at each batch it looks for the helper's
blocks and loads them. A helper that fails, times out, or whose blocks do not fit the real
model's calls costs nothing but CPU time: the actor compiles as before. On a warm node the helper
is stopped as soon as the precompiled blocks are loaded.

Cost: a second process on the actor's GPU for ~20 s (its CUDA context, ~0.6 GB of weights, one
batch's activations of one block), and its CPU.

Measured (one H100, 2026-12-05, RESULTS "Eighteenth session"): cold 3,000-page jobs 4.1-6.6 s
shorter. Not yet measured: whether the blocks it compiles run as fast as the actor's own (until
commit ``0b315ae`` it compiled with two pages, whose size hints differ from a batch's; the
actor's rate after them was not separated from its eager batches'), hence opt-in.

``$VDR_COMPILE_HELPER``: ``0`` (the default) or ``1``. ``$VDR_COMPILE_HELPER_TIMEOUT_S``
(default 180): after it the actor stops waiting and compiles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
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
BATCH = "batch.json"  # written by the actor at its first batch: page shapes, cache key and places
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wanted(device: str, compile_model: bool, precompiled: bool | None) -> bool:
    """Whether an actor with these settings starts a helper (``$VDR_COMPILE_HELPER``)."""
    on = env_flag(ENV, False)
    if not on or not compile_model or precompiled is False:
        return False
    return precompiled is not None or env_flag("VDR_PRECOMPILE", True)


# The GPU memory an actor needs free at its start for a helper beside it: the actor's model and
# batches (peak 6.4-10 GiB at batch 32 on an H200, RESULTS) and the helper's context, one-block
# model and one batch through one block (a few GiB). Below it (or with 16 GB cards) no helper.
MIN_FREE_BYTES = 16 << 30


def room_for_helper(free_bytes: int | None) -> bool:
    """Whether a GPU with ``free_bytes`` free (None: unknown) leaves room for a helper."""
    return free_bytes is None or free_bytes >= MIN_FREE_BYTES


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "180")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: give the seconds the actor waits for its compile helper (> 0)")
    return value


class CompileHelper:
    """The actor's handle on its helper process. :meth:`pending` is the blocks' ``defer`` hook;
    :meth:`first_batch` tells the helper what to compile for; :meth:`collect` loads its blocks."""

    def __init__(self, model: str, device: str, dtype: str = "auto", attn_implementation: str | None = None,
                 precision: str = "default", endpoint_url: str | None = None, command: list[str] | None = None):
        self.timeout_s = timeout_s()
        _sweep_stale(2 * self.timeout_s)
        self.dir = tempfile.mkdtemp(prefix="vdr-compile-helper-")
        args = {"model": model, "device": device, "dtype": dtype, "attn_implementation": attn_implementation,
                "precision": precision, "endpoint_url": endpoint_url, "dir": self.dir, "parent": os.getpid(),
                "timeout_s": self.timeout_s}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        self.log_path = os.path.join(self.dir, "helper.log")
        self.started = time.monotonic()
        self.started_wall = time.time()
        with open(self.log_path, "wb") as out:
            # its own process group, so that stop() ends Inductor's compile workers with it; run from
            # the package's folder, so that `-m` finds this code before any other `pipeline` on the path
            self.proc = subprocess.Popen(command or [sys.executable, "-m", "pipeline.embed.compile_helper",
                                                     json.dumps(args)],
                                         env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.state = "running"  # then: loaded, failed (...), timed out, stopped (...)
        self.ready_s: float | None = None  # seconds from its start to its blocks written
        self.loaded_s: float | None = None  # seconds from its start to the actor loading them
        self.variants = 0
        self.note: str | None = None
        self.eager_batches = 0  # counted by the actor: batches with blocks run eagerly while it ran
        self._told = False
        self._lock = threading.Lock()

    def pending(self) -> bool:
        return self.state == "running"

    def first_batch(self, shapes: list[tuple[int, int]], key: str | None, shared_uri: str | None,
                    endpoint_url: str | None) -> None:
        """Tell the helper the first batch's page shapes (height, width) and where to save its
        blocks (the compile cache's key; None: do not save). Once; later calls do nothing."""
        with self._lock:
            if self._told or self.state != "running":
                return
            self._told = True
            path = os.path.join(self.dir, BATCH)
            try:
                with open(path + ".partial", "w") as f:
                    json.dump({"shapes": [list(s) for s in shapes], "key": key, "shared_uri": shared_uri,
                               "endpoint_url": endpoint_url}, f)
                os.replace(path + ".partial", path)
            except OSError as exc:  # its folder is gone (stopped meanwhile): nothing to tell
                log.warning("compile helper not told the first batch (%s)", type(exc).__name__)

    def collect(self, forwards: list) -> int | None:
        """If the helper has written its blocks (or ended without them): load them into
        ``forwards`` (once) and return the variants loaded (0 when it failed); None while it runs."""
        if self.state != "running":
            return None
        path = os.path.join(self.dir, RESULT)
        if not os.path.exists(path) and self.proc.poll() is None:
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
            if not os.path.exists(path):
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
                shutil.rmtree(self.dir, ignore_errors=True)
                return 0
            self.variants = n
            self.note = self._last_line()  # its own timings: model built, waited, compiled
            self.ready_s = round(os.path.getmtime(path) - self.started_wall, 3)
            self.loaded_s = round(time.monotonic() - self.started, 3)
            self.state = "loaded"
            log.info("compile helper: %d compiled block variants loaded, %.1f s after it started", n, self.loaded_s)
            # it may still be saving them to the compile cache: it ends by itself, its folder goes now
            shutil.rmtree(self.dir, ignore_errors=True)
            return n

    def stop(self, reason: str = "stopped") -> None:
        """End the helper and its compile workers (a warm node needs none; it timed out)."""
        with self._lock:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    self.proc.kill()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            if self.state == "running":
                self.state = reason
            shutil.rmtree(self.dir, ignore_errors=True)

    def summary(self, forwards: list) -> dict:
        return {"state": self.state, "ready_s": self.ready_s, "loaded_s": self.loaded_s, "variants": self.variants,
                "note": self.note, "eager_batches": self.eager_batches,
                "eager_calls": {pf.name: pf.eager_calls for pf in forwards}}

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
        # An actor going away: a helper told what to compile finishes, saves the blocks for the
        # node's next actor and removes its folder itself; one not yet told has nothing to save.
        if getattr(self, "_told", True) or getattr(self, "state", None) != "running":
            return
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _sweep_stale(age_s: float) -> None:
    """Remove helper folders older than ``age_s`` (no helper lives that long): those of helpers
    killed with their actor (Ray ends a worker's child processes when the worker exits)."""
    tmp = tempfile.gettempdir()
    now = time.time()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith("vdr-compile-helper-")]
    except OSError:
        return
    for name in names:
        path = os.path.join(tmp, name)
        try:
            if now - os.path.getmtime(path) > age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _watch_parent(parent: int, told: threading.Event, folder: str, deadline: float) -> None:
    """End this process when the actor has gone before telling it what to compile (nothing to
    save), or when its time is up; an actor that has gone after telling it lets it finish and
    save the blocks for the node's next actor."""
    while True:
        if time.monotonic() > deadline:
            print("compile helper: out of time", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            os._exit(5)
        # told: the actor wrote its first batch (read or not yet: a helper still importing when a
        # short job's actor ended was ended here, and the node left without blocks; seen under load)
        if os.getppid() != parent and not (told.is_set() or os.path.exists(os.path.join(folder, BATCH))):
            shutil.rmtree(folder, ignore_errors=True)
            os._exit(4)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """The helper process: compile every block type on a one-block random-weights model, for the
    actor's first batch's page shapes, write the compiled blocks for the actor and save them under
    the model's key in the compile cache."""
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s compile helper %(message)s")
    started = time.monotonic()
    told = threading.Event()
    threading.Thread(target=_watch_parent, args=(args["parent"], told, args["dir"], started + args["timeout_s"]),
                     daemon=True).start()
    import numpy as np
    import torch

    from pipeline.embed import compile_cache, precompile
    from pipeline.embed.model import embed_pages, load_model

    lm = load_model(args["model"], device=args["device"], dtype=args["dtype"],
                    attn_implementation=args["attn_implementation"], endpoint_url=args["endpoint_url"],
                    compile_model=True, precision=args["precision"], precompiled=True, layers=1)
    built = time.monotonic() - started
    if not lm.precompiled or all(pf.fallback is not None for pf in lm.precompiled):
        print("no block can be compiled ahead of time here (see the warnings above)", flush=True)
        return 3
    batch_path = os.path.join(args["dir"], BATCH)
    while not os.path.exists(batch_path):  # until the actor's first batch (or the watcher ends it)
        time.sleep(0.05)
    with open(batch_path) as f:
        batch = json.load(f)
    told.set()
    waited = time.monotonic() - started - built
    rng = np.random.default_rng(0)
    # a batch of one page compiles a variant of its own: two pages at least, as a batch of more would
    shapes = [tuple(s) for s in batch["shapes"]] or [(896, 672)]
    shapes = shapes * 2 if len(shapes) == 1 else shapes
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    embed_pages(lm, images, out_dtype=torch.float16)
    compiled = time.monotonic() - started - built - waited
    data = precompile.dumps(lm.precompiled)
    out = os.path.join(args["dir"], RESULT)
    with open(out + ".partial", "wb") as f:
        f.write(data)
    variants = sum(len(pf.variants) for pf in lm.precompiled)
    print(f"compiled {variants} block variants for {len(images)} pages: model built in {built:.1f} s, waited "
          f"{waited:.1f} s for the first batch, compiled in {compiled:.1f} s, {len(data)} bytes", flush=True)
    os.replace(out + ".partial", out)  # the actor loads them from here
    if batch.get("key"):
        compile_cache.save_precompiled(batch["key"], lm.precompiled, batch.get("shared_uri"), batch.get("endpoint_url"))
    if os.getppid() != args["parent"]:  # the actor has gone: nobody else removes the folder
        shutil.rmtree(args["dir"], ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown (Inductor's workers, CUDA): seconds the actor need not wait for


if __name__ == "__main__":
    sys.exit(main())
