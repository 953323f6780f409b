"""Warm starts: torch.compile's artefacts kept between actors, per node and optionally in
object storage, so that an actor on a node (or a cluster) that compiled this model before
skips most of the compilation of its first batch.

This is PyTorch's own portable cache (``torch.compiler.save_cache_artifacts`` /
``load_cache_artifacts``: Inductor's FX-graph and autotuning caches, Triton kernels), stored
as one file per key. The key covers everything the compiled code depends on: the model's
config, the dtype, the device (GPU name and compute capability), torch and Triton versions,
and how the blocks are compiled. A cache that does not fit is never loaded; a damaged or
foreign file only costs a cold compile, never a wrong result (Inductor checks its own keys
when it looks entries up).

Beside each cache file, ``precompiled-<key>.bin`` holds the blocks compiled ahead of time
(:mod:`pipeline.embed.precompile`, the default): loaded, they skip Dynamo's tracing too.

Locations: ``$VDR_COMPILE_CACHE`` (default ``/tmp/vdr-compile-cache``, one per node) and,
with ``--compile-cache URI``, a shared prefix (``s3://``, ``gs://``, a shared filesystem)
that new nodes read first. Writes are whole-object (:func:`pipeline.storage.write_bytes_atomic`).

Kernel libraries with a disk cache of their own (FlashAttention 4: one ``.o`` file per compiled
kernel, under a folder named for its sources' fingerprint) are shared the same way: the files of
the node's folder as one archive at the shared prefix (:func:`save_kernel_dir`), whose missing
files a new node adds to its folder before the library looks (:func:`load_kernel_dir`). The
library checks its own keys and recompiles an entry it cannot load.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time

import torch

from pipeline import storage

log = logging.getLogger(__name__)

LOCAL_ENV = "VDR_COMPILE_CACHE"
SCHEME = "blocks-dynamic-v2"  # how load_model compiles: each vision block and text layer, dynamic=True,
# the vision attention an opaque operator (v2, 2026-12-04: v1 caches hold graphs of the old attention)


# Where a first batch's compilation went, from torch's own timers
# (``torch._dynamo.utils.compilation_time_metrics``, seconds summed per phase): all of it, Dynamo's
# bytecode tracing, the backend (AOTAutograd + Inductor, cache lookups included), loading the
# generated modules, building guards. Names may change with torch; missing ones are left out.
COMPILE_PHASES = {"compile": "_compile.compile_inner", "trace": "bytecode_tracing",
                  "backend": "OutputGraph.call_user_compiler", "load_modules": "PyCodeCache.load_by_key_path",
                  "guards": "build_guards"}


def compile_times() -> dict[str, float]:
    """Seconds this process has spent so far in each of :data:`COMPILE_PHASES`."""
    try:
        from torch._dynamo.utils import compilation_time_metrics as metrics
    except ImportError:  # a torch without these timers
        return {}
    return {name: round(sum(metrics[key]), 2) for name, key in COMPILE_PHASES.items() if key in metrics}


def local_dir() -> str:
    return os.environ.get(LOCAL_ENV) or os.path.join(tempfile.gettempdir(), "vdr-compile-cache")


# Config entries that say where a checkpoint was loaded from, not what it computes: a model
# copied to another folder (each job's fetch of an s3:// model, a benchmark's temporary
# directory) compiles to the same code. Keyed on them, every such copy compiled cold (measured
# on an H200, 2026-12-03: "compile cache cold" in a second job on the same node).
_LOCATION_KEYS = frozenset({"_name_or_path", "name_or_path", "_commit_hash"})


def architecture(config: dict) -> dict:
    """``config`` without the entries that name the checkpoint's location (nested configs too)."""
    return {k: architecture(v) if isinstance(v, dict) else v
            for k, v in config.items() if k not in _LOCATION_KEYS}


def cache_key(model_config: dict, dtype: str, device: str, attn_implementation: str | None = None,
              precompiled: bool = False) -> str:
    """A name for the compiled artefacts of one model on one kind of device. The same
    architecture loaded from two places gets the same name (:func:`architecture`).
    ``attn_implementation`` (the loaded model's ``config._attn_implementation``: sdpa, eager,
    flash_attention_2) is part of it: ``config.to_dict()`` leaves it out, yet each compiles
    to other code, so runs with another --attn-implementation would load, then overwrite,
    each other's artefacts and compile cold every time. ``precompiled``: the blocks compiled
    ahead of time (:mod:`pipeline.embed.precompile`), whose compilation leaves other artefacts."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        hw = f"{torch.cuda.get_device_name(index)} sm{''.join(map(str, torch.cuda.get_device_capability(index)))}"
    else:
        import platform

        hw = f"cpu {platform.machine()}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    parts = {"config": architecture(model_config), "dtype": dtype, "hw": hw, "torch": torch.__version__,
             "triton": triton_version, "scheme": SCHEME, "attn": attn_implementation}
    if precompiled:
        parts["precompiled"] = precompile_format()
    from pipeline.embed import inductor_heuristics

    if inductor_heuristics.tag():  # Inductor's heuristics changed (persistent norms, on by default): other kernels
        parts["heuristics"] = inductor_heuristics.tag()
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return f"compile-{digest}.bin"


def precompile_format() -> str:
    from pipeline.embed.precompile import FORMAT

    return FORMAT


def _locations(shared_uri: str | None) -> list[str]:
    return [u for u in (shared_uri, local_dir()) if u]


def load(key: str, shared_uri: str | None = None, endpoint_url: str | None = None) -> str | None:
    """Load the first cache found (the shared one first, then this node's); returns where it
    came from, or None (a cold start). Never raises: a cache is an optimisation."""
    for base in _locations(shared_uri):
        uri = storage.join_uri(base, key)
        try:
            data = storage.read_bytes(uri, endpoint_url)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except Exception as exc:  # noqa: BLE001 - unreadable cache: compile cold
            log.warning("compile cache %s could not be read (%s): compiling cold", uri, type(exc).__name__)
            continue
        try:
            # None when the bytes are not a cache of this torch (it logs why): compile cold.
            loaded = torch.compiler.load_cache_artifacts(data)
        except Exception as exc:  # noqa: BLE001 - foreign or damaged: compile cold
            loaded, reason = None, type(exc).__name__
        else:
            reason = "not a compile cache of this torch"
        if loaded is None:
            log.warning("compile cache %s could not be loaded (%s): compiling cold", uri, reason)
            continue
        log.info("compile cache loaded from %s (%d bytes)", uri, len(data))
        return uri
    return None


def save(key: str, shared_uri: str | None = None, endpoint_url: str | None = None) -> int:
    """Write this process's compiled artefacts to this node's cache and the shared one.
    Returns the bytes written per location (0 when there was nothing to save)."""
    t = time.perf_counter()
    # Dynamo records new artefacts under its compile lock; serializing takes and clears that
    # list, so with two batches in flight (another thread may be compiling) it is taken too.
    lock = getattr(getattr(torch._dynamo, "convert_frame", None), "compile_lock", None)
    try:
        with lock if lock is not None else contextlib.nullcontext():
            saved = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # noqa: BLE001
        log.warning("compile cache not saved (%s)", type(exc).__name__)
        return 0
    if not saved:
        return 0
    data = saved[0]
    for base in _locations(shared_uri):
        uri = storage.join_uri(base, key)
        try:
            if "://" not in base:
                os.makedirs(base, exist_ok=True)
            storage.write_bytes_atomic(uri, data, endpoint_url)
        except Exception as exc:  # noqa: BLE001 - a read-only cache location must not fail the job
            log.warning("compile cache not written to %s (%s)", uri, type(exc).__name__)
    log.info("compile cache saved: %d bytes in %.1f s", len(data), time.perf_counter() - t)
    return len(data)


def precompiled_key(key: str) -> str:
    """The name of the precompiled blocks (:mod:`pipeline.embed.precompile`) beside ``key``."""
    return key.replace("compile-", "precompiled-", 1)


def load_precompiled(key: str, forwards: list, shared_uri: str | None = None,
                     endpoint_url: str | None = None) -> str | None:
    """Load the precompiled blocks saved beside ``key`` into ``forwards`` (the shared location
    first, then this node's); returns where they came from, or None. Never raises."""
    from pipeline.embed import precompile

    if not forwards or all(pf.fallback is not None for pf in forwards):
        return None
    for base in _locations(shared_uri):
        uri = storage.join_uri(base, precompiled_key(key))
        try:
            data = storage.read_bytes(uri, endpoint_url)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except Exception as exc:  # noqa: BLE001
            log.warning("precompiled blocks %s could not be read (%s)", uri, type(exc).__name__)
            continue
        t = time.perf_counter()
        try:
            n = precompile.loads(data, forwards)
        except Exception as exc:  # noqa: BLE001 - foreign or damaged: compile instead
            log.warning("precompiled blocks %s could not be loaded (%s)", uri, type(exc).__name__)
            continue
        log.info("precompiled blocks loaded from %s: %d variants in %.2f s", uri, n, time.perf_counter() - t)
        if n:
            return uri
    return None


def save_precompiled(key: str, forwards: list, shared_uri: str | None = None,
                     endpoint_url: str | None = None) -> int:
    """Write the precompiled blocks of ``forwards`` beside ``key`` (this node's location and the
    shared one). Returns the bytes written (0: nothing to save, or it failed)."""
    from pipeline.embed import precompile

    if not any(pf.variants and pf.fallback is None for pf in forwards):
        return 0
    try:
        data = precompile.dumps(forwards)
    except Exception as exc:  # noqa: BLE001 - not serializable: a warm start traces again
        log.warning("precompiled blocks not saved (%s: %s)", type(exc).__name__, str(exc)[:300])
        return 0
    return save_precompiled_bytes(key, data, shared_uri, endpoint_url)


def save_precompiled_bytes(key: str, data: bytes, shared_uri: str | None = None,
                           endpoint_url: str | None = None) -> int:
    """Write a :func:`pipeline.embed.precompile.dumps` blob beside ``key`` (this node's location
    and the shared one). Returns the bytes written."""
    for base in _locations(shared_uri):
        uri = storage.join_uri(base, precompiled_key(key))
        try:
            if "://" not in base:
                os.makedirs(base, exist_ok=True)
            storage.write_bytes_atomic(uri, data, endpoint_url)
        except Exception as exc:  # noqa: BLE001
            log.warning("precompiled blocks not written to %s (%s)", uri, type(exc).__name__)
    return len(data)



KERNEL_SUFFIX = ".o"  # FlashAttention 4's compiled kernels (flash_attn.cute.cache_utils)
KERNEL_MAX_BYTES = 256 << 20  # one kernel file from an archive, at most (FA4's are a few MB)
KERNEL_ARCHIVE_MAX_BYTES = 2 << 30  # all of an archive's kernels, at most


def kernel_files(local: str) -> dict[str, int]:
    """The compiled kernels under ``local``: path relative to it -> bytes (hidden files, a
    library's writes in progress, and its lock files left out)."""
    out = {}
    for root, dirs, files in os.walk(local):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.endswith(KERNEL_SUFFIX) and not name.startswith("."):
                path = os.path.join(root, name)
                with contextlib.suppress(OSError):
                    out[os.path.relpath(path, local)] = os.path.getsize(path)
    return out


def _add_whole(src, dest: str) -> bool:
    """Write ``src`` (a file object) to ``dest`` unless a file is there: a hidden temporary
    beside it, linked into place (a file that appeared meanwhile is kept), then removed."""
    fd, part = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
        os.link(part, dest)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(part)


def load_kernel_dir(name: str, local: str, shared_uri: str | None,
                    endpoint_url: str | None = None) -> dict[str, int]:
    """Add to ``local`` the kernels of the shared archive ``name`` that it lacks, each written
    whole before it appears under its name. Only regular files of :data:`KERNEL_SUFFIX` inside
    the folder, of bounded size, are taken. Returns the archive's kernels (path -> bytes; empty:
    none there). Never raises: a missing, unreadable or damaged archive only means compiling.

    The files are native code that the library loads: whoever can write ``shared_uri`` can run
    code on the nodes that read it, as with the compile cache's other artefacts."""
    members: dict[str, int] = {}
    if not shared_uri:
        return members
    uri = storage.join_uri(shared_uri, name)
    try:
        data = storage.read_bytes(uri, endpoint_url)
    except (FileNotFoundError, NotADirectoryError):
        return members
    except Exception as exc:  # noqa: BLE001
        log.warning("kernel archive %s could not be read (%s): compiling", uri, type(exc).__name__)
        return members
    added = total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                rel = os.path.normpath(member.name)
                if (member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or os.path.isabs(rel)
                        or rel.startswith("..") or not rel.endswith(KERNEL_SUFFIX)
                        or os.path.basename(rel).startswith(".") or member.size > KERNEL_MAX_BYTES
                        or total + member.size > KERNEL_ARCHIVE_MAX_BYTES):
                    continue  # only kernel files, inside the folder, of a sane size
                total += member.size
                members[rel] = member.size
                dest = os.path.join(local, rel)
                if os.path.exists(dest):
                    continue  # this node's own: kept
                try:
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    with tar.extractfile(member) as src:
                        added += _add_whole(src, dest)
                except OSError as exc:  # this one compiles; the others are still added
                    log.warning("kernel %s not added from %s (%s)", rel, uri, type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - damaged: what was added is whole, the rest compiles
        log.warning("kernel archive %s could not be unpacked (%s): compiling what is missing", uri,
                    type(exc).__name__)
    if added:
        log.info("%d compiled kernels from %s", added, uri)
    return members


def save_kernel_dir(name: str, local: str, shared_uri: str | None, endpoint_url: str | None = None,
                    only: str | None = None) -> int:
    """Write the kernels under ``local`` (under its subfolder ``only``, when given) as one archive
    ``name`` at the shared location. Returns its bytes (0: nothing to save, no shared location,
    or the write failed). Never raises."""
    files = sorted(f for f in kernel_files(local) if only is None or f.startswith(only + os.sep)) if shared_uri else []
    if not files:
        return 0
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w:") as tar:
            for rel in files:
                try:
                    f = open(os.path.join(local, rel), "rb")  # opened first: its size is the one copied
                except FileNotFoundError:
                    continue
                with f:
                    tar.addfile(tar.gettarinfo(arcname=rel, fileobj=f), f)
        uri = storage.join_uri(shared_uri, name)
        if "://" not in shared_uri:
            os.makedirs(shared_uri, exist_ok=True)
        storage.write_bytes_atomic(uri, buf.getvalue(), endpoint_url)
    except Exception as exc:  # noqa: BLE001 - a read-only cache location must not fail the job
        log.warning("kernel archive %s not written (%s)", name, type(exc).__name__)
        return 0
    log.info("%d compiled kernels saved to %s (%d bytes)", len(files), uri, len(buf.getvalue()))
    return len(buf.getvalue())
