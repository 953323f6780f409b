"""Which kernel computes the vision tower's attention: SDPA, or FlashAttention 4 where installed.

Qwen2-VL's vision heads are 80 wide. SDPA's fastest kernel on Hopper (cuDNN's flash forward)
computes them 128 wide; FlashAttention 4's Hopper forward (``flash_attn.cute``, the
``flash-attn-4`` package) pads them only to 80, and its varlen form takes the batch's
``cu_seqlens`` as they are, any mix of page sizes in one call. On an H100 (2026-12-06,
benchmarks/RESULTS.md) the attention of 32 letter pages took 3.12 ms against 3.85, and the actor
ran 68.5 pages/s against 64.2, its vectors within bf16 rounding of SDPA's.

``--vision-attention``: ``auto`` (the default) runs FA4 where it is installed, the GPU is a
Hopper (compute capability 9.x, the only one measured), the model computes in bf16 or fp16 and
its vision attention goes through ``vdr::image_attention`` (Qwen2-VL without FlashAttention 2),
else SDPA; ``fa4`` insists (an error, before the weights load where it can be told then, saying
what to change); ``sdpa`` never uses it. FA4's import and its kernel's compile take seconds, so
an actor loads it in a thread after the model is loaded and runs SDPA until it is ready. That
thread still costs the start: its Python holds the GIL beside the first batches (H100,
2026-12-06: load to first batch 1.6-2.05 s against 0.86-0.94 s warm; a cold node's first eager
batch 4.7-5.2 s against ~1.1 s while FA4's kernel compiles), about what FA4's 5% saves on a
3,000-page job; longer jobs gain. Its compiled kernels are kept per node (FA4's own disk cache,
under the compile cache's folder) and, with ``--compile-cache URI``, mirrored file by file at that
shared location, in a folder per GPU architecture and FA4 sources and versions
(:func:`pipeline.embed.compile_cache.load_kernel_files`), so that a new node loads them instead of
compiling (H100s, 2026-12-06: FA4's load 1.0-1.4 s with the shared kernel against 3.1-4.9 s
compiling; benchmarks/RESULTS.md, twenty-eighth session). A call that fails in FA4 falls back to SDPA for the rest of
the actor's life, with a warning and the error in the summary.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

CHOICES = ("auto", "sdpa", "fa4")
# where neither --vision-attention nor --config gives one; read on the driver (pipeline.config.embed_config)
ENV = "VDR_VISION_ATTENTION"
INSTALL_HINT = "pip install 'vdr-pipeline[fa4]' (flash-attn-4) on the GPU nodes"

# The kernel vdr::image_attention runs instead of SDPA (None: SDPA), and the error of a call that
# failed in it (it is then dropped). One per process: an actor process holds one model. Read once
# per call, so a call runs one kernel.
ACTIVE: dict = {"attend": None, "runtime_error": None}


def runtime_failure(exc: BaseException) -> None:
    """A call of the loaded kernel failed: SDPA from now on (this call included), said once."""
    if ACTIVE["attend"] is not None:
        ACTIVE["attend"] = None
        ACTIVE["runtime_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        log.warning("FlashAttention 4 failed in a call; the vision attention runs on SDPA from now on: %s",
                    ACTIVE["runtime_error"])


def fa4_installed() -> bool:
    """flash_attn.cute importable (without importing it: its import takes seconds)."""
    try:
        return importlib.util.find_spec("flash_attn") is not None and \
            importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        return False


HALF_DTYPES = ("bfloat16", "float16")  # FA4's inputs


def decide(requested: str, device: str, capability: tuple[int, int] | None, installed: bool,
           op_in_use: bool = True, dtype: str = "bfloat16") -> str:
    """The kernel an actor on ``device`` (CUDA ``capability``) runs for ``--vision-attention
    requested``: "sdpa" or "fa4". ``fa4`` where it cannot run is a ValueError saying why.
    ``op_in_use``: the model's vision attention goes through vdr::image_attention (Qwen2-VL with
    SDPA; not Qwen2.5-VL's windows, nor flash_attention_2), the only place FA4 is swapped in;
    ``dtype`` the model's compute dtype (FA4 takes bf16 and fp16 only)."""
    if requested not in CHOICES:
        raise ValueError(f"--vision-attention must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "sdpa":
        return "sdpa"
    on_hopper = device.startswith("cuda") and capability is not None and capability[0] == 9
    if requested == "auto":
        return "fa4" if on_hopper and installed and op_in_use and dtype in HALF_DTYPES else "sdpa"
    if not op_in_use:
        raise ValueError("--vision-attention fa4 needs the batched vision attention of Qwen2-VL models with "
                         "--attn-implementation sdpa (auto picks it without FlashAttention 2); this model's "
                         "vision attention runs elsewhere. Use --vision-attention auto or sdpa")
    if not device.startswith("cuda"):
        raise ValueError(f"--vision-attention fa4 runs on GPUs only; this actor runs on {device}. "
                         "Use --vision-attention auto or sdpa")
    if not on_hopper:
        raise ValueError(f"--vision-attention fa4 is measured on Hopper GPUs (compute capability 9.x) only; "
                         f"this GPU has {capability[0]}.{capability[1]}. Use --vision-attention auto or sdpa"
                         if capability else "--vision-attention fa4: no CUDA device capability known")
    if dtype not in HALF_DTYPES:
        raise ValueError(f"--vision-attention fa4 takes bf16 or fp16 inputs; the model computes in {dtype}. "
                         "Use --dtype bfloat16 (the default on GPUs), or --vision-attention auto or sdpa")
    if not installed:
        raise ValueError(f"--vision-attention fa4: flash_attn.cute is not installed on this node: {INSTALL_HINT}, "
                         "or use --vision-attention auto")
    return "fa4"


def fa4_attention(q, k, v, lengths, cu_seqlens, scale):
    """``vdr::image_attention`` through FA4's varlen kernel: q, k, v (patches, heads, dim),
    ``cu_seqlens`` the images' offsets; returns (patches, heads * dim)."""
    import torch
    from flash_attn.cute import flash_attn_varlen_func

    # the longest image: from the host's lengths where they add up, else from cu_seqlens (a sync)
    if lengths is not None and int(lengths.sum()) == q.shape[0]:
        max_len = int(lengths.max())
    else:
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                 max_seqlen_k=max_len, softmax_scale=scale)
    return (out[0] if isinstance(out, tuple) else out).reshape(q.shape[0], -1)


def fa4_ready(device: str, heads: int, head_dim: int, dtype) -> Callable:
    """Import FA4 and compile its kernel for this head size and dtype (one call on two images of
    the letter page's 3,072 patches; the compile key holds no lengths, so every batch reuses it);
    returns the attention."""
    import torch

    length = 3072
    q = torch.randn(2 * length, heads, head_dim, device=device, dtype=dtype)
    cu = torch.tensor([0, length, 2 * length], dtype=torch.int32, device=device)
    with torch.cuda.device(device):
        fa4_attention(q, q, q, torch.tensor([length, length]), cu, head_dim ** -0.5)
        torch.cuda.current_stream().synchronize()
    return fa4_attention


class VisionAttention:
    """An actor's vision attention kernel: SDPA from the start, FA4 once a thread has loaded it.

    ``load`` (default :func:`fa4_ready`) returns the attention function; it runs in a daemon
    thread and sets :data:`ACTIVE` when done. A load that fails leaves SDPA, with a warning and
    the error in :meth:`summary`."""

    def __init__(self, kernel: str, started: float, load: Callable[[], Callable] | None = None,
                 requested: str | None = None, after_ready: Callable[[], None] | None = None,
                 kernel_cache: dict | None = None):
        self.kernel, self.started, self.requested = kernel, started, requested or kernel
        # run in the thread once FA4 is in use (sharing its compiled kernels); what it did, for the summary
        self.after_ready, self.kernel_cache = after_ready, kernel_cache
        self.state = "sdpa" if kernel == "sdpa" else "loading"
        self.ready_after_s: float | None = None  # after the actor's constructor began
        self.ready_at: float | None = None  # unix time (the summary puts it on the job's clock)
        self.load_s: float | None = None
        self.error: str | None = None
        self.sdpa_batches = 0  # batches begun before FA4 was ready
        # _done: the load has ended (wait()); _finished: after_ready too (pending, the summary's last word)
        self._done, self._finished = threading.Event(), threading.Event()
        self._count_lock = threading.Lock()
        ACTIVE["attend"], ACTIVE["runtime_error"] = None, None
        if kernel == "sdpa":
            self._done.set()
            self._finished.set()
            return
        self._thread = threading.Thread(target=self._run, args=(load,), name="vdr-fa4-load", daemon=True)
        self._thread.start()

    def _run(self, load) -> None:
        t = time.perf_counter()
        try:
            attend = load()
        except Exception as exc:  # noqa: BLE001 - SDPA stays; the summary says why
            self.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.state = "failed"
            log.warning("FlashAttention 4 could not be loaded, the vision attention stays on SDPA: %s", self.error)
        else:
            ACTIVE["runtime_error"] = None  # cleared before the kernel is published: a failing call's error stays
            ACTIVE["attend"] = attend
            self.state = "fa4"
            self.ready_at = time.time()
            self.ready_after_s = round(self.ready_at - self.started, 2)
        self.load_s = round(time.perf_counter() - t, 2)
        self._done.set()
        try:
            if self.state == "fa4" and self.after_ready is not None:
                self.after_ready()
        except Exception as exc:  # noqa: BLE001 - FA4 runs; only the sharing failed
            log.warning("FlashAttention 4's compiled kernels were not shared: %s: %s", type(exc).__name__, exc)
        finally:
            self._finished.set()

    def batch_begins(self) -> None:
        """Count a batch that starts before FA4 is ready (it runs on SDPA)."""
        if self.state == "loading":
            with self._count_lock:  # two batch threads
                self.sdpa_batches += 1

    def wait(self, timeout: float | None = None) -> bool:
        """Until the load has ended (benchmarks: time one kernel only); True when it has."""
        return self._done.wait(timeout)

    @property
    def pending(self) -> bool:
        """The load, or the sharing of its kernels after it, still running: the summary is provisional."""
        return not self._finished.is_set()

    def summary(self) -> dict:
        state, error = self.state, self.error
        if state == "fa4" and ACTIVE["runtime_error"]:
            state, error = "failed at runtime", ACTIVE["runtime_error"]
        out: dict = {"requested": self.requested, "kernel": state}
        if self.kernel != "sdpa":
            out.update(ready_after_s=self.ready_after_s, ready_at=self.ready_at, load_s=self.load_s,
                       sdpa_batches_before=self.sdpa_batches)
            if error:
                out["error"] = error
            if self.kernel_cache:
                out["kernel_cache"] = dict(self.kernel_cache)
        return out


def _capability(device: str) -> tuple[int, int] | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return tuple(torch.cuda.get_device_capability(device))


def check(requested: str, device: str, dtype: str, op_in_use: bool = True) -> None:
    """What can be told before the weights load: ``fa4`` refused (ValueError) on a CPU, another GPU,
    a float32 model, a node without FA4 or with an attention implementation other than SDPA. The
    model's kind (Qwen2.5-VL's windows) is told after (:func:`start`)."""
    decide(requested, device, _capability(device), fa4_installed(), op_in_use, dtype)


def start(requested: str, device: str, model_config, started: float, op_in_use: bool = True,
          cache_dir: str | None = None, load: Callable[[], Callable] | None = None,
          dtype=None, shared_uri: str | None = None, endpoint_url: str | None = None) -> VisionAttention:
    """The actor's :class:`VisionAttention` for ``--vision-attention requested`` (ValueError where
    ``fa4`` cannot run), its FA4 load begun in a thread where it will run (``op_in_use``: see
    :func:`decide`; ``dtype`` the model's torch dtype, bf16 when None). With ``shared_uri``
    (``--compile-cache``) and a ``cache_dir`` that FA4 uses, the load first adds the shared
    kernels that FA4's disk cache lacks, and once FA4 runs, the kernels this node compiled or
    repaired, or holds and the shared folder lacks, are written there."""
    import torch

    dtype = dtype or torch.bfloat16
    kernel = decide(requested, device, _capability(device), fa4_installed(), op_in_use,
                    str(dtype).removeprefix("torch."))
    if kernel == "fa4" and load is None:
        vision = model_config.vlm_config.vision_config
        heads = int(vision.num_heads)
        head_dim = int(vision.embed_dim) // heads
        if cache_dir:  # FA4's own disk cache of compiled kernels, unless the user set one (before the thread)
            os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
            os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", cache_dir)
        load = lambda: fa4_ready(device, heads, head_dim, dtype)  # noqa: E731
    after_ready = kernel_cache = None
    if (kernel == "fa4" and shared_uri and cache_dir
            and os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1") == "1"):
        # FA4 reads its disk cache only when enabled (start() enables it above, unless the user said no)
        local = os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", cache_dir)
        load, after_ready, kernel_cache = _shared_kernels(load, local, _capability(device), shared_uri, endpoint_url)
    return VisionAttention(kernel, started, load, requested, after_ready, kernel_cache)


def fa4_build() -> str:
    """What FA4's compiled kernels depend on besides the GPU, read without importing it (its
    import takes seconds): Python's version, its packages' versions and its CuTe sources, as
    FA4's own fingerprint hashes them (flash_attn.cute.cache_utils)."""
    import hashlib
    import sys
    from importlib import metadata
    from pathlib import Path

    h = hashlib.sha256(f"py{sys.version_info[0]}.{sys.version_info[1]}".encode())
    for dist in ("flash-attn-4", "nvidia-cutlass-dsl", "apache-tvm-ffi"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    try:
        spec = importlib.util.find_spec("flash_attn.cute")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for src in sorted(Path(folder).rglob("*.py")):
            h.update(src.relative_to(folder).as_posix().encode())
            h.update(src.read_bytes())
    return h.hexdigest()[:16]


def _fa4_fingerprint() -> str | None:
    """The subfolder of FA4's disk cache for the running FA4 (its sources' fingerprint), or None."""
    try:
        from flash_attn.cute.cache_utils import _compute_source_fingerprint
    except Exception:  # noqa: BLE001 - another FA4 layout: the whole folder is shared
        return None
    return _compute_source_fingerprint()


def _shared_kernels(load: Callable[[], Callable], local: str, capability, shared_uri: str,
                    endpoint_url: str | None):
    """``load`` preceded by adding the shared folder's kernels to ``local``; the step that writes
    this node's new ones there once FA4 runs; and the record of both for the summary."""
    from pipeline import storage
    from pipeline.embed import compile_cache as cc

    record: dict = {"folder": None, "added": 0, "saved": 0}
    seen: dict = {}

    def load_shared() -> Callable:
        seen["since"] = time.time()
        # in the load's thread: fa4_build reads FA4's sources, which the actor's start need not wait for
        record["folder"] = storage.join_uri(shared_uri, "fa4-kernels",
                                            f"sm{capability[0]}{capability[1]}-{fa4_build()}")
        folder = record["folder"]
        try:
            os.makedirs(local, exist_ok=True)
        except OSError as exc:  # FA4 then compiles in memory (it warns); nothing to share
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            seen["shared"], seen["added"] = cc.load_kernel_files(folder, local, endpoint_url)
            record["added"] = len(seen["added"])
            if seen["shared"] is None:
                record["error"] = "the shared folder could not be listed"
        return load()

    def save_new() -> None:
        if seen.get("shared") is None:
            return  # no folder, or no listing: writing blind could only duplicate
        record["saved"], _ = cc.save_kernel_files(record["folder"], local, seen["shared"], seen["since"],
                                                  skip=set(seen["added"]),
                                                  only=_fa4_fingerprint(), endpoint_url=endpoint_url)

    return load_shared, save_new, record
