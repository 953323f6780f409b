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
that new nodes read first. Writes are whole-object (:func:`pipeline.storage.write_bytes_atomic`),
and a cache file only grows: each save writes the union of what the location holds, what the
process loaded and what it compiled (:func:`save`).

Kernel libraries with a disk cache of their own (FlashAttention 4: one ``.o`` file per compiled
kernel, under a folder named for its sources' fingerprint) are mirrored file by file under the
shared prefix: a new node adds the files its folder lacks before the library looks
(:func:`load_kernel_files`); a node uploads the files it compiled or repaired
(:func:`save_kernel_files`). No file is ever removed there, so nodes writing at once lose nothing.
The library checks its own keys and recompiles an entry it cannot load. The files are native code
that the library loads: whoever can write the shared prefix can run code on the nodes that read
it, as with the compiled artefacts above.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
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


# The artefacts this process loaded, per key, so that what it saves holds them too.
_loaded: dict[str, dict[str, dict]] = {}


def _artifacts(data: bytes) -> dict[str, dict]:
    """Every artefact in a saved cache: per kind, by (key, content). Raises on a file that is
    not a cache of this torch, and where torch moved its internals.

    torch's own reader (``CacheArtifactManager.deserialize``) makes a dict of the parts in the
    file, so of a file written after a process saved twice (``save_cache_artifacts`` appends a
    part per kind at each call) it keeps only the last part of each kind: the graphs of the
    first batch were lost when a later batch compiled a new page size. This reads every part.
    An artefact is named by its key and its content together: Inductor and AOTAutograd keep
    several entries under one key (one per set of shape guards, e.g. a graph compiled with
    dynamic shapes for small and for large sizes), and kinds with one entry per key (autotune
    results) are populated in file order, so the later of two wins."""
    from torch.compiler._cache import CacheArtifactManager, _deserialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer

    CacheArtifactManager._ensure_cache_artifacts_registered()
    out: dict[str, dict] = {}
    for kind, artifacts in AppendingByteSerializer.to_list(data, deserialize_fn=_deserialize_single_cache):
        out.setdefault(kind, {}).update(((a.key, a.content), a) for a in artifacts)
    return out


def _union(*caches: dict[str, dict]) -> dict[str, dict]:
    """The artefacts of all ``caches``, in order (an artefact already there keeps its place)."""
    out: dict[str, dict] = {}
    for cache in caches:
        for kind, artifacts in cache.items():
            held = out.setdefault(kind, {})
            held.update((name, a) for name, a in artifacts.items() if name not in held)
    return out


def _count(cache: dict[str, dict]) -> int:
    return sum(len(a) for a in cache.values())


def _to_bytes(cache: dict[str, dict]) -> bytes:
    """A cache file with one part per kind, which torch's own loader reads whole."""
    from torch.compiler._cache import _serialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer

    out = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    out.extend((kind, list(artifacts.values())) for kind, artifacts in cache.items())
    return out.to_bytes()


def _populate(data: bytes) -> dict[str, dict] | None:
    """Put a saved cache's artefacts into torch's caches; returns them (None: not a cache of
    this torch, or nothing in it)."""
    try:
        from torch.compiler._cache import CacheArtifactManager

        cache = _artifacts(data)
    except ImportError:  # torch moved its internals: its own loader (the last part of each kind)
        return {} if torch.compiler.load_cache_artifacts(data) is not None else None
    except Exception:  # noqa: BLE001 - not this torch's format
        return None
    if not _count(cache):
        return None
    CacheArtifactManager.populate_caches({kind: list(a.values()) for kind, a in cache.items()})
    return cache


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
            loaded = _populate(data)
        except Exception as exc:  # noqa: BLE001 - foreign or damaged: compile cold
            loaded, reason = None, type(exc).__name__
        else:
            reason = "not a compile cache of this torch"
        if loaded is None:
            log.warning("compile cache %s could not be loaded (%s): compiling cold", uri, reason)
            continue
        _loaded[key] = _union(_loaded.get(key, {}), loaded)
        log.info("compile cache loaded from %s (%d bytes, %d artefacts)", uri, len(data), _count(loaded))
        return uri
    return None


def save(key: str, shared_uri: str | None = None, endpoint_url: str | None = None) -> int:
    """Add this process's compiled artefacts to this node's cache and the shared one.

    torch records only the artefacts a process compiles or looks up, so a process that saw
    fewer page sizes than the one before it, or loaded precompiled blocks and never asked
    Inductor for theirs, has less to save than the file holds. Each location therefore gets the
    union of what it holds, what this process loaded and what it compiled, and is written only
    where that adds to it: a node that loaded the shared cache gets its own copy, and no file
    shrinks. A location that cannot be read (other than not being there, or access denied, which
    S3 answers for a missing key without ``s3:ListBucket``) is left as it is; a
    file that is not a cache of this torch is replaced. Two processes writing one location at
    once can each drop the other's new artefacts; they come back when a process that has them
    saves again (after compiling something new). Returns a positive number once the artefacts
    are saved, and 0 when there was nothing to save or torch could not serialize them."""
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
    if not saved and not _loaded.get(key):
        return 0
    try:
        mine = _union(_loaded.get(key, {}), _artifacts(saved[0]) if saved else {})
    except Exception as exc:  # noqa: BLE001 - torch moved its internals: write its own file, as it is
        log.info("compile cache written as torch saved it (%s)", type(exc).__name__)
        mine = None
        if not saved:
            return 0
    written = []
    for base in _locations(shared_uri):
        uri = storage.join_uri(base, key)
        try:
            if mine is None:
                data = saved[0]
            else:
                try:
                    held = storage.read_bytes(uri, endpoint_url)
                except (FileNotFoundError, NotADirectoryError):
                    held = None
                except Exception as exc:  # noqa: BLE001 - not readable now: writing could drop what it holds
                    if storage.access_denied(exc):  # S3 without s3:ListBucket: a missing key (bad credentials fail the write)
                        held = None
                    else:
                        log.warning("compile cache %s not updated: it could not be read (%s)", uri,
                                    type(exc).__name__)
                        continue
                try:
                    there = _artifacts(held) if held is not None else {}
                except Exception:  # noqa: BLE001 - damaged or another torch's: replaced
                    there = {}
                merged = _union(there, mine)
                if _count(merged) == _count(there):
                    continue  # it holds all of this process's already
                data = _to_bytes(merged)
            if "://" not in base:
                os.makedirs(base, exist_ok=True)
            storage.write_bytes_atomic(uri, data, endpoint_url)
            written.append(len(data))
        except Exception as exc:  # noqa: BLE001 - a read-only cache location must not fail the job
            log.warning("compile cache not written to %s (%s)", uri, type(exc).__name__)
    log.info("compile cache saved in %.1f s: %s", time.perf_counter() - t,
             f"{', '.join(map(str, written))} bytes written" if written else "every location held it already")
    return max(written, default=len(saved[0]) if saved else 1)


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
            if base != local_dir():
                _keep_on_node(precompiled_key(key), data)
            return uri
    return None


def _keep_on_node(name: str, data: bytes) -> None:
    """A copy in this node's cache of what was loaded from the shared one, where the node has
    none: the node's later actors start warm without the shared store (an outage, a job without
    ``--compile-cache``), and it is kept as the node's own. Never raises."""
    path = os.path.join(local_dir(), name)
    if os.path.exists(path):
        return
    try:  # the write makes the folder
        storage.write_bytes_atomic(path, data)
    except Exception as exc:  # noqa: BLE001 - the shared copy still serves
        log.warning("precompiled blocks not copied to this node's cache %s (%s)", path, type(exc).__name__)


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
KERNEL_MAX_BYTES = 256 << 20  # one kernel file from the shared prefix, at most (FA4's are a few MB)
KERNELS_MAX_BYTES = 2 << 30  # all of them, at most


def _kernel_name(rel: str) -> bool:
    """A kernel file's path inside the folder: no way out of it, nothing hidden."""
    parts = rel.split("/")
    return (rel.endswith(KERNEL_SUFFIX) and not rel.startswith("/")
            and not any(p in ("", ".", "..") or p.startswith(".") for p in parts))


def kernel_files(local: str) -> dict[str, tuple[int, float]]:
    """The compiled kernels under ``local``: path relative to it ('/'-separated) -> (bytes,
    modification time). Hidden files, a library's writes in progress and its lock files are left out."""
    out = {}
    for root, dirs, files in os.walk(local):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local).replace(os.sep, "/")
            if _kernel_name(rel):
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    out[rel] = (st.st_size, st.st_mtime)
    return out


def _add_whole(data: bytes, dest: str) -> bool:
    """Write ``data`` to ``dest`` unless a file is there: a hidden temporary beside it, readable
    as the library's own files are, linked into place (a file that appeared meanwhile is kept;
    where the filesystem has no hard links, renamed if still absent), then removed."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, part = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)
            out.write(data)
        try:
            os.link(part, dest)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network and FUSE filesystems)
            if os.path.exists(dest):
                return False
            os.replace(part, dest)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(part)


def load_kernel_files(shared_uri: str, local: str, endpoint_url: str | None = None) -> tuple[dict[str, int] | None, list[str]]:
    """Add to ``local`` the kernel files under the shared folder ``shared_uri`` that it lacks,
    each written whole before it appears under its name; only kernel files (:func:`_kernel_name`)
    of bounded size. Returns (the shared files: path -> bytes, or None when the folder could not
    be listed; the paths added). Never raises: what is not added is compiled."""
    try:
        _, infos = storage.list_files(shared_uri, endpoint_url, suffix=KERNEL_SUFFIX, recursive=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}, []
    except Exception as exc:  # noqa: BLE001
        log.warning("compiled kernels at %s could not be listed (%s): compiling", shared_uri, type(exc).__name__)
        return None, []
    _, root = storage.open_filesystem(shared_uri, endpoint_url)
    root = root.rstrip("/") + "/"
    shared: dict[str, int] = {}
    added: list[str] = []
    total = 0
    for info in infos:
        rel = info.path[len(root):] if info.path.startswith(root) else info.base_name
        size = int(info.size or 0)
        if not _kernel_name(rel) or size > KERNEL_MAX_BYTES or total + size > KERNELS_MAX_BYTES:
            continue
        total += size
        shared[rel] = size
        dest = os.path.join(local, *rel.split("/"))
        if os.path.exists(dest):
            continue  # this node's own: kept
        try:
            data = storage.read_bytes(storage.join_uri(shared_uri, rel), endpoint_url)
            if len(data) == size and _add_whole(data, dest):
                added.append(rel)
        except Exception as exc:  # noqa: BLE001 - this one compiles; the others are still added
            log.warning("kernel %s not added from %s (%s)", rel, shared_uri, type(exc).__name__)
    if added:
        log.info("%d compiled kernels from %s", len(added), shared_uri)
    return shared, added


def save_kernel_files(shared_uri: str, local: str, shared: dict[str, int], since: float, skip=(),
                      only: str | None = None, endpoint_url: str | None = None) -> tuple[int, int]:
    """Upload the kernel files under ``local`` (its subfolder ``only``, when given) that the shared
    folder lacks (``shared``, as :func:`load_kernel_files` listed it), or that were written since
    ``since`` (compiled or repaired there), except ``skip`` (added from there). Returns (files,
    bytes) uploaded. Never raises."""
    files = bytes_ = 0
    for rel, (size, mtime) in sorted(kernel_files(local).items()):
        if (only is not None and not rel.startswith(only + "/")) or rel in skip:
            continue
        if rel in shared and mtime < since:
            continue  # there already; this node's older copy does not replace it
        try:
            with open(os.path.join(local, *rel.split("/")), "rb") as f:
                data = f.read()
            storage.write_bytes_atomic(storage.join_uri(shared_uri, rel), data, endpoint_url)
        except Exception as exc:  # noqa: BLE001 - a read-only cache location must not fail the job
            log.warning("kernel %s not written to %s (%s)", rel, shared_uri, type(exc).__name__)
            continue
        files, bytes_ = files + 1, bytes_ + len(data)
    if files:
        log.info("%d compiled kernels written to %s (%d bytes)", files, shared_uri, bytes_)
    return files, bytes_
