"""A new node's blocks compiled in helper processes, while the actor loads its weights and runs
its first batches eagerly (on by default on a GPU; ``VDR_COMPILE_HELPER=0`` turns it off).

On a node that has never compiled this model (no precompiled blocks in this node's or the shared
``--compile-cache``), the actor's first batch compiles the vision block and the text layer with
the GPU idle: 8-13 s on an H200 or H100 after a 6-10 s model load, which kept a whole 3,000-page
job on such a node at 60-72% of the actor's rate (RESULTS.md, fourteenth to nineteenth sessions).
Compiling in a thread beside eager batches did not help: both need the GIL, and the eager batches
ran at ~12 pages/s instead of ~42 (eleventh session).

With the helpers, the actor starts, before it imports transformers, ``python -m
pipeline.embed.compile_helper`` once per part (``$VDR_COMPILE_HELPER_PROCESSES``, default 1: one
helper compiles both block types in turn; 2: one helper per block type, the vision block's and the
text layer's compiled side by side). Each builds the same architecture with one vision block, one text
layer and random weights (:func:`pipeline.embed.model.load_model` with ``layers=1``: the blocks'
compiled code depends on their shapes and dtypes, not on the weights' values or the number of
blocks). It waits for the actor's first batch to learn the page shapes and the batch size (so
Inductor compiles with the size hints the actor's own first batch would have given it), runs
random pages of those shapes through the actor's code path (the block types of the other helpers
eagerly), so that its block types are compiled for the calls a batch makes, and writes the
compiled blocks (:func:`pipeline.embed.precompile.dumps`) for the actor. The last helper to write
saves every part's blocks together under the model's key in this node's compile cache and
``--compile-cache`` (outside Ray an actor that ends first lets its helpers finish and save; a Ray
worker's child processes end with it, so under Ray a job that ends before the helpers have
compiled leaves the node without blocks, and its next actor starts helpers again). Meanwhile the
actor loads its weights and runs each block type eagerly until its helper's blocks are loaded
(:attr:`pipeline.embed.precompile.PrecompiledForward.defer`; the eager path is the training
code's, the compiled one within bf16 rounding of it); at each batch it looks for blocks a helper
has written and loads them. A helper that fails, times out, or whose blocks do not fit the real
model's calls costs nothing but CPU time: the actor compiles that helper's block types as before.
On a warm node the helpers are stopped as soon as the precompiled blocks are loaded.

Cost: each helper is a second process on the actor's GPU for ~15-25 s (its CUDA context, ~0.6 GB
of weights, one batch's activations of one block), and its CPU. Measured on one H100 (RESULTS
"Twentieth session", nvidia-smi once a second): one helper 4.8 GiB at its peak; two helpers 4.8 and
9.3 GiB; the actor beside them 13.1 GiB. None starts where the GPU has less than 20 GiB free.

Measured (RESULTS "Eighteenth" to "Twentieth session"): the helpers' blocks run at the
actor's rate (H200: 65.70 against 65.68 pages/s for the actor alone, the same vectors; a later
job's actor 65.75 against 65.78); cold 3,000-page jobs 4.0 s shorter on an H200 (74.4% of the actor
alone against 69.9%) and 4.1-7.5 s on H100s; two helpers instead of one ready 2.5-4.4 s earlier,
jobs 0.3-1.0 s shorter (H100, two pairs), then 0.85-1.6 s longer on another H100 (two pairs, twentieth
session): no difference a job shows, for 9.3 GiB more GPU memory, so one helper is the default.

``$VDR_COMPILE_HELPER``: unset (on with a GPU, off on a CPU), ``1`` or ``0``.
``$VDR_COMPILE_HELPER_PROCESSES``: ``1`` (default) or ``2``. ``$VDR_COMPILE_HELPER_TIMEOUT_S``
(default 180): after it the actor stops waiting and compiles.
"""

from __future__ import annotations

import fcntl
import functools
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
PROCESSES_ENV = "VDR_COMPILE_HELPER_PROCESSES"
BATCH = "batch.json"  # written by the actor at its first batch: page shapes, cache key and places
LOCK = "parts.lock"  # the helpers' turns at reading each other's blocks and writing their own
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def result_name(part: int) -> str:
    """The file helper ``part`` writes its compiled blocks to, in the helpers' folder."""
    return f"precompiled.{part}.bin"


def wanted(device: str, compile_model: bool, precompiled: bool | None) -> bool:
    """Whether an actor with these settings starts helpers: ``$VDR_COMPILE_HELPER`` 1 or 0; unset,
    on a GPU only (on a CPU the helpers would take the cores the actor's batches need)."""
    on = env_flag(ENV, str(device).startswith("cuda"))
    if not on or not compile_model or precompiled is False:
        return False
    return precompiled is not None or env_flag("VDR_PRECOMPILE", True)


# The GPU memory an actor needs free at its start for a helper beside it: the actor's model and
# batches and the helper's context, one-block model and one batch through its blocks. Measured on
# one H100 at batch 32, 768 tokens (nvidia-smi once a second, 2026-12-05): the actor 13.1 GiB, one
# helper 4.8 GiB, 17.9 GiB together. Below it (or with 16 GB cards) no helper.
MIN_FREE_BYTES = 20 << 30


# Each helper after the first (VDR_COMPILE_HELPER_PROCESSES=2): the second of two helpers peaked at
# 9.3 GiB in the same measurement.
EXTRA_HELPER_BYTES = 10 << 30


def room_for_helper(free_bytes: int | None) -> bool:
    """Whether a GPU with ``free_bytes`` free (None: unknown) leaves room for one helper."""
    return free_bytes is None or free_bytes >= MIN_FREE_BYTES


def helpers_with_room(free_bytes: int | None, wanted_parts: int) -> int:
    """How many of ``wanted_parts`` helpers a GPU with ``free_bytes`` free has room for: all,
    one (less than :data:`EXTRA_HELPER_BYTES` more per extra helper), or none."""
    if not room_for_helper(free_bytes):
        return 0
    if free_bytes is None or free_bytes >= MIN_FREE_BYTES + (wanted_parts - 1) * EXTRA_HELPER_BYTES:
        return wanted_parts
    return 1


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "180")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: give the seconds the actor waits for its compile helper (> 0)")
    return value


def processes() -> int:
    """``$VDR_COMPILE_HELPER_PROCESSES``: 1 (the default: one helper compiles both block types in
    turn) or 2 (one helper per block type, the vision block's and the text layer's compiled side by
    side: ready 0.8-4.4 s sooner, 9.3 GiB more GPU memory, no difference a job shows: -1.0 to
    +1.6 s over four pairs on two H100s)."""
    raw = os.environ.get(PROCESSES_ENV, "").strip() or "1"
    if raw not in ("1", "2"):
        raise ValueError(f"{PROCESSES_ENV}={raw!r}: use 1 (one helper for both block types, the default) or 2 "
                         "(a helper per block type)")
    return int(raw)


class CompileHelper:
    """The actor's handle on its helper processes (``parts`` of them: helper ``i`` compiles the
    block types ``i``, ``i + parts``, ... of the model's precompiled blocks, in their order:
    the vision block, the text layer). :meth:`defer_hook` gives each block type's ``defer``
    (eager while its helper runs); :meth:`first_batch` tells the helpers what to compile for;
    :meth:`collect` loads each helper's blocks once it has written them."""

    def __init__(self, model: str, device: str, dtype: str = "auto", attn_implementation: str | None = None,
                 precision: str = "default", endpoint_url: str | None = None, command: list[str] | None = None,
                 parts: int | None = None):
        self.timeout_s = timeout_s()
        self.parts = processes() if parts is None else parts
        _sweep_stale(2 * self.timeout_s)
        self.dir = tempfile.mkdtemp(prefix="vdr-compile-helper-")
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.procs: list[subprocess.Popen] = []
        self.log_paths: list[str] = []
        try:
            self._start(model, device, dtype, attn_implementation, precision, endpoint_url, command)
        except BaseException:  # one could not start: none runs (the actor compiles, as without helpers)
            for proc in self.procs:
                _kill_group(proc)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        # each part: running, then loaded, failed (...), timed out ..., stopped (...)
        self.part_states = ["running"] * self.parts
        self.part_blocks: list[list[str]] = [[] for _ in range(self.parts)]
        self.part_ready_s: list[float | None] = [None] * self.parts
        self.part_loaded_s: list[float | None] = [None] * self.parts
        self.state = "running"  # all parts: running, loaded, or the first part's failure (see _settle)
        self.ready_s: float | None = None  # seconds from their start to the last part's blocks written
        self.loaded_s: float | None = None  # seconds from their start to the actor loading the last part's
        self.variants = 0
        self.note: str | None = None
        self.eager_batches = 0  # counted by the actor: batches with blocks run eagerly while they ran
        self._told = False
        self._lock = threading.Lock()

    def _start(self, model, device, dtype, attn_implementation, precision, endpoint_url, command) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        for part in range(self.parts):
            args = {"model": model, "device": device, "dtype": dtype, "attn_implementation": attn_implementation,
                    "precision": precision, "endpoint_url": endpoint_url, "dir": self.dir, "parent": os.getpid(),
                    "timeout_s": self.timeout_s, "part": part, "parts": self.parts}
            self.log_paths.append(os.path.join(self.dir, f"helper.{part}.log"))
            with open(self.log_paths[-1], "wb") as out:
                # its own process group, so that stop() ends Inductor's compile workers with it; run from
                # the package's folder, so that `-m` finds this code before any other `pipeline` on the path
                self.procs.append(subprocess.Popen(command or [sys.executable, "-m", "pipeline.embed.compile_helper",
                                                               json.dumps(args)],
                                                   env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True))

    def pending(self) -> bool:
        return self.state == "running"

    def part_pending(self, part: int) -> bool:
        return self.part_states[part] == "running"

    def defer_hook(self, index: int):
        """``defer`` for the model's ``index``-th precompiled block type: eager while its helper runs."""
        return functools.partial(self.part_pending, index % self.parts)

    def first_batch(self, shapes: list[tuple[int, int]], key: str | None, shared_uri: str | None,
                    endpoint_url: str | None) -> None:
        """Tell the helpers the first batch's page shapes (height, width) and where to save their
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
        """Load the blocks of each helper that has written them (or mark one that ended without
        them, or each past its time, as failed): returns the variants loaded by this call (0 when
        the only change was a helper that failed, or one that wrote no variant), None when nothing
        changed (all still running, or all decided before)."""
        if self.state != "running":
            return None
        from pipeline.embed import precompile

        loaded, changed = 0, False
        with self._lock:
            if self.state != "running":
                return None
            timed_out = time.monotonic() - self.started > self.timeout_s
            for part, proc in enumerate(self.procs):
                if self.part_states[part] != "running":
                    continue
                path = os.path.join(self.dir, result_name(part))
                if not os.path.exists(path):
                    if proc.poll() is None:
                        if timed_out:
                            self._kill(part)
                            self.part_states[part] = f"timed out after {self.timeout_s:g} s"
                            log.warning("compile helper %d: no compiled blocks after %g s (%s); compiling here",
                                        part, self.timeout_s, TIMEOUT_ENV)
                            changed = True
                        continue
                    if not os.path.exists(path):  # looked at again: it may have written them just before exiting
                        self.part_states[part] = f"failed (exit {proc.returncode}): {self._last_line(part)}"
                        log.warning("compile helper %d %s; its blocks are compiled here. The end of its log:\n%s",
                                    part, self.part_states[part], self._tail(part))
                        changed = True
                        continue
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                    names = precompile.names(data)
                    n = precompile.loads(data, [pf for pf in forwards if pf.name in names])
                except Exception as exc:  # noqa: BLE001 - unusable blocks: compile here
                    self.part_states[part] = f"failed: its blocks could not be loaded ({type(exc).__name__})"
                    log.warning("compile helper %d %s; they are compiled here", part, self.part_states[part])
                    changed = True
                    continue
                self.part_blocks[part] = sorted(names)
                self.part_ready_s[part] = round(os.path.getmtime(path) - self.started_wall, 3)
                self.part_loaded_s[part] = round(time.monotonic() - self.started, 3)
                self.part_states[part] = "loaded"
                self.variants += n
                loaded += n
                changed = True
                log.info("compile helper %d: %d compiled block variants (%s) loaded, %.1f s after it started",
                         part, n, ", ".join(sorted(names)), self.part_loaded_s[part])
            if not changed:
                return None
            self._settle()
        return loaded

    def _settle(self) -> None:
        """The overall state once no part runs: loaded (every part), the failure of the one that
        failed (none loaded), or ``partly failed: ...`` (some loaded). Then the folder goes (a
        helper may still be saving the blocks to the compile cache: it ends by itself)."""
        if any(s == "running" for s in self.part_states):
            return
        failures = [s for s in self.part_states if s != "loaded"]
        if not failures:
            self.state = "loaded"
        elif len(failures) == self.parts:
            self.state = failures[0]
        else:
            self.state = f"partly failed: {failures[0]}"
        ready = [r for r in self.part_ready_s if r is not None]
        self.ready_s = max(ready) if ready else None
        loaded = [r for r in self.part_loaded_s if r is not None]
        self.loaded_s = max(loaded) if loaded else None
        self.note = " | ".join(self._last_line(p) for p in range(self.parts))  # their own timings
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill(self, part: int) -> None:
        proc = self.procs[part]
        if proc.poll() is None:
            _kill_group(proc)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, reason: str = "stopped") -> None:
        """End the helpers and their compile workers (a warm node needs none; they timed out)."""
        with self._lock:
            for part in range(self.parts):
                self._kill(part)
                if self.part_states[part] == "running":
                    self.part_states[part] = reason
            if self.state == "running":
                self.state = reason
            shutil.rmtree(self.dir, ignore_errors=True)

    def summary(self, forwards: list) -> dict:
        out = {"state": self.state, "ready_s": self.ready_s, "loaded_s": self.loaded_s, "variants": self.variants,
               "note": self.note, "eager_batches": self.eager_batches,
               "eager_calls": {pf.name: pf.eager_calls for pf in forwards}}
        if self.parts > 1:
            out["parts"] = [{"state": self.part_states[p], "blocks": self.part_blocks[p],
                             "ready_s": self.part_ready_s[p], "loaded_s": self.part_loaded_s[p]}
                            for p in range(self.parts)]
        return out

    def _lines(self, part: int) -> list[str] | None:
        try:
            with open(self.log_paths[part], "rb") as f:
                return [ln for ln in f.read()[-8000:].decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return None

    def _last_line(self, part: int) -> str:
        lines = self._lines(part)
        if lines is None:
            return "no log"
        return lines[-1][:300] if lines else "no output"

    def _tail(self, part: int, n: int = 20) -> str:
        return "\n".join((self._lines(part) or [])[-n:])

    def __del__(self):
        # An actor going away: helpers told what to compile finish, save the blocks for the node's
        # next actor and remove their folder themselves; ones not yet told have nothing to save.
        if getattr(self, "_told", True) or getattr(self, "state", None) != "running":
            return
        for proc in getattr(self, "procs", []):
            _kill_group(proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a helper and its process group (Inductor's compile workers); no wait."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        try:
            proc.kill()
        except OSError:
            pass


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
            # the folder stays: another helper's blocks may be in it, not yet loaded (the actor
            # removes it once every helper has ended; the next helper sweeps one left behind)
            print("compile helper: out of time", flush=True)
            os._exit(5)
        # told: the actor wrote its first batch (read or not yet: a helper still importing when a
        # short job's actor ended was ended here, and the node left without blocks; seen under load)
        if os.getppid() != parent and not (told.is_set() or os.path.exists(os.path.join(folder, BATCH))):
            shutil.rmtree(folder, ignore_errors=True)
            os._exit(4)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """A helper process: compile its block types (``part`` of ``parts``; the others run eagerly)
    on a one-block random-weights model, for the actor's first batch's page shapes, write the
    compiled blocks for the actor, and save every part's under the model's key in the compile
    cache once all are written (the last helper to write saves them all)."""
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    part, parts = args.get("part", 0), args.get("parts", 1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s compile helper {part} %(message)s")
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
    mine = [pf for i, pf in enumerate(lm.precompiled) if i % parts == part]
    for pf in lm.precompiled:
        if pf not in mine:  # another helper's: run eagerly here
            pf.defer = lambda: True
    if mine and all(pf.fallback is not None for pf in mine):
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
    if mine:
        embed_pages(lm, images, out_dtype=torch.float16)
    fell_back = [pf.name for pf in mine if pf.fallback is not None]
    if mine and len(fell_back) == len(mine):  # nothing to hand over: the actor compiles them (and falls back) itself
        print(f"{', '.join(fell_back)}: ahead-of-time compilation fell back ({mine[0].fallback_reason})", flush=True)
        return 3
    compiled = time.monotonic() - started - built - waited
    data = precompile.dumps(mine)
    variants = sum(len(pf.variants) for pf in mine)
    # In turn with the other helpers: read the blocks they have written, then write these (the
    # actor removes the folder only once every helper has written, so the last one finds them all)
    others = []
    with open(os.path.join(args["dir"], LOCK), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for other in range(parts):
            if other != part and os.path.exists(os.path.join(args["dir"], result_name(other))):
                with open(os.path.join(args["dir"], result_name(other)), "rb") as f:
                    others.append(f.read())
        out = os.path.join(args["dir"], result_name(part))
        with open(out + ".partial", "wb") as f:
            f.write(data)
        print(f"compiled {variants} block variants ({', '.join(pf.name for pf in mine) or 'none'}) for "
              f"{len(images)} pages: model built in {built:.1f} s, waited {waited:.1f} s for the first batch, "
              f"compiled in {compiled:.1f} s, {len(data)} bytes", flush=True)
        os.replace(out + ".partial", out)  # the actor loads them from here
    if batch.get("key") and len(others) == parts - 1:
        try:
            merged = precompile.merge([data, *others])
        except Exception as exc:  # noqa: BLE001 - another part's blob unreadable: the actor saves what it compiles
            print(f"not saved: the other helpers' blocks could not be merged ({type(exc).__name__})", flush=True)
        else:
            compile_cache.save_precompiled_bytes(batch["key"], merged, batch.get("shared_uri"),
                                                 batch.get("endpoint_url"))
    if os.getppid() != args["parent"]:  # the actor has gone: nobody else removes the folder
        if len(others) == parts - 1:
            shutil.rmtree(args["dir"], ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown (Inductor's workers, CUDA): seconds the actor need not wait for


if __name__ == "__main__":
    sys.exit(main())
