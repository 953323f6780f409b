"""Which kernel computes the vision tower's attention: SDPA, or FlashAttention 4 where installed.

Qwen2-VL's vision heads are 80 wide. SDPA's fastest kernel on Hopper (cuDNN's flash forward)
computes them 128 wide; FlashAttention 4's Hopper forward (``flash_attn.cute``, the
``flash-attn-4`` package) pads them only to 80, and its varlen form takes the batch's
``cu_seqlens`` as they are, any mix of page sizes in one call. On an H100 (2026-12-06,
benchmarks/RESULTS.md) the attention of 32 letter pages took 3.12 ms against 3.85, and the actor
ran 68.5 pages/s against 64.2, its vectors within bf16 rounding of SDPA's.

``--vision-attention``: ``auto`` (the default) runs FA4 where it is installed and the GPU is a
Hopper (compute capability 9.x, the only one measured), else SDPA; ``fa4`` insists (an error
where it cannot run); ``sdpa`` never uses it. FA4's import and its kernel's compile take seconds
(its import alone 6.6 s on a fresh H100 node), so an actor loads it in a thread after the model
is loaded and runs SDPA until it is ready: the first batches are never held back for it. Its
compiled kernels are kept per node (FA4's own disk cache, under the compile cache's folder).
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
ENV = "VDR_VISION_ATTENTION"  # where --vision-attention is left at auto (forwarded to the actors)
INSTALL_HINT = "pip install 'vdr-pipeline[fa4]' (flash-attn-4) on the GPU nodes"

# The kernel vdr::image_attention runs on CUDA tensors instead of SDPA (None: SDPA). One per
# process: an actor process holds one model. Read once per call, so a call runs one kernel.
ACTIVE: dict = {"attend": None}


def fa4_installed() -> bool:
    """flash_attn.cute importable (without importing it: its import takes seconds)."""
    try:
        return importlib.util.find_spec("flash_attn") is not None and \
            importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        return False


def decide(requested: str, device: str, capability: tuple[int, int] | None, installed: bool,
           op_in_use: bool = True) -> str:
    """The kernel an actor on ``device`` (CUDA ``capability``) runs for ``--vision-attention
    requested``: "sdpa" or "fa4". ``fa4`` where it cannot run is a ValueError saying why.
    ``op_in_use``: the model's vision attention goes through vdr::image_attention (Qwen2-VL with
    SDPA; not Qwen2.5-VL's windows, nor flash_attention_2), the only place FA4 is swapped in."""
    if requested not in CHOICES:
        raise ValueError(f"--vision-attention must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "sdpa":
        return "sdpa"
    on_hopper = device.startswith("cuda") and capability is not None and capability[0] == 9
    if requested == "auto":
        return "fa4" if on_hopper and installed and op_in_use else "sdpa"
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


def fa4_ready(device: str, heads: int, head_dim: int, cache_dir: str | None = None) -> Callable:
    """Import FA4 and compile its kernel for this head size (one call on two small images of the
    letter page's 3,072 patches, so that the real batches reuse it); returns the attention."""
    import torch

    if cache_dir:  # FA4's own disk cache of compiled kernels, unless the user set one
        os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
        os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", cache_dir)
    length = 3072
    q = torch.randn(2 * length, heads, head_dim, device=device, dtype=torch.bfloat16)
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
                 requested: str | None = None):
        self.kernel, self.started, self.requested = kernel, started, requested or kernel
        self.state = "sdpa" if kernel == "sdpa" else "loading"
        self.ready_after_s: float | None = None
        self.load_s: float | None = None
        self.error: str | None = None
        self.sdpa_batches = 0  # batches begun before FA4 was ready
        self._done = threading.Event()
        ACTIVE["attend"] = None
        if kernel == "sdpa":
            self._done.set()
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
            ACTIVE["attend"] = attend
            self.state = "fa4"
            self.ready_after_s = round(time.time() - self.started, 2)
        self.load_s = round(time.perf_counter() - t, 2)
        self._done.set()

    def batch_begins(self) -> None:
        """Count a batch that starts before FA4 is ready (it runs on SDPA)."""
        if self.state == "loading":
            self.sdpa_batches += 1

    def wait(self, timeout: float | None = None) -> bool:
        """Until the load has ended (benchmarks: time one kernel only); True when it has."""
        return self._done.wait(timeout)

    @property
    def pending(self) -> bool:
        return not self._done.is_set()

    def summary(self) -> dict:
        out: dict = {"requested": self.requested, "kernel": self.state}
        if self.kernel != "sdpa":
            out.update(ready_after_s=self.ready_after_s, load_s=self.load_s, sdpa_batches_before=self.sdpa_batches)
            if self.error:
                out["error"] = self.error
        return out


def start(requested: str, device: str, model_config, started: float, op_in_use: bool = True,
          cache_dir: str | None = None, load: Callable[[], Callable] | None = None) -> VisionAttention:
    """The actor's :class:`VisionAttention` for ``--vision-attention requested`` (ValueError where
    ``fa4`` cannot run), its FA4 load begun in a thread where it will run (``op_in_use``: see
    :func:`decide`)."""
    if requested == "auto" and os.environ.get(ENV):  # the flag left at auto: $VDR_VISION_ATTENTION decides
        requested = os.environ[ENV].strip().lower()
    capability = None
    if device.startswith("cuda"):
        import torch

        capability = tuple(torch.cuda.get_device_capability(device))
    kernel = decide(requested, device, capability, fa4_installed(), op_in_use)
    if kernel == "fa4" and load is None:
        vision = model_config.vlm_config.vision_config
        heads = int(vision.num_heads)
        head_dim = int(vision.embed_dim) // heads
        load = lambda: fa4_ready(device, heads, head_dim, cache_dir)  # noqa: E731
    return VisionAttention(kernel, started, load, requested)
