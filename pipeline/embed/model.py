"""ColQwen2 loading and the forward passes that match the training code (colpali-engine).

Two things differ from the transformers docs' plain loop, on purpose:

* **M-RoPE positions.** transformers >= 5.5 calls the backbone of ``ColQwen2ForRetrieval``
  with ``inputs_embeds`` only, so image tokens get 1-D positions instead of the 3-D
  positions the checkpoint was trained with (FACTS.md). We compute
  ``vlm.get_rope_index(...)`` ourselves and pass ``position_ids``.
* **Pinned prompts.** Prompt formats drift between library versions; ours are constants,
  built into token ids here (not by the processor's ``__call__``) and recorded with every
  output.

Pages reach the actor as uint8 RGB images already resized to the model's grid on CPU
workers (``pipeline.embed.rasterize``); rescale, normalize and patchify are elementwise and run
on the actor's device (shipping float32 patches would be 8x the bytes of the image).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import importlib.util
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
from typing import Sequence

import numpy as np
import torch

from pipeline.config import DEFAULT_MAX_VISUAL_TOKENS, DEFAULT_MODEL, env_flag  # noqa: F401  (re-exported)
from pipeline.schema import IMAGE_PROMPT, QUERY_AUGMENTATION, QUERY_PREFIX, QUERY_PROMPT  # noqa: F401

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<|image_pad|>"
MIN_VISUAL_TOKENS = 4


# The unary ops that ATen hands to MKL's VML for contiguous float32 and float64 CPU tensors
# (aten/src/ATen/cpu/vml.h, IMPLEMENT_VML_MKL; the list is the same in torch 2.13).
_MKL_VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin",
                "sqrt", "tan", "tanh", "trunc")
_MKL_VML_WARM = False
_MKL_VML_LOCK = threading.Lock()


def warm_up_mkl_vml() -> None:
    """Call each of those VML functions once, on one element, in this thread only, so that
    MKL has chosen its kernel for each before a real call runs it on several threads at once.

    Why: oneMKL 2024.2 (the one in torch's x86-64 wheels) picks each VML function's kernel
    lazily, at its first call, and when that first call runs on two intra-op threads at once
    (a tensor above ATen's grain of 2,048 elements), one thread can run a low-accuracy
    kernel on its whole half, though high accuracy was asked for: pytorch/pytorch#188792
    (fix proposed in #188791: the same one-element warm-up, inside ATen). In a CPU process the
    model's first ``cos`` is the vision rotary embedding's (272 x 2 x 4 angles for the tests'
    three pages): under CPU load its second half came out up to 1.5e-4 off (cos(1) =
    0.5403335 for 0.5403023), so the process's first batch of pages differed from every
    later one by float16 ulps after pooling (tests/embed/test_ward_on_device.py: 5 in 110
    runs beside two busy loops on a 2-core host). Later calls use the right kernel. One element is
    below the grain, so each warm-up call runs in the calling thread alone. Once per process."""
    global _MKL_VML_WARM
    if _MKL_VML_WARM:
        return
    with _MKL_VML_LOCK:  # two threads loading models: one warms up while the other waits
        if _MKL_VML_WARM or not torch.backends.mkl.is_available():
            _MKL_VML_WARM = True
            return
        with torch.inference_mode():
            for dtype in (torch.float32, torch.float64):
                x = torch.full((1,), 0.5, dtype=dtype, device="cpu")  # whatever the default device
                for op in _MKL_VML_OPS:
                    getattr(torch, op)(x)
        _MKL_VML_WARM = True


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPU (as trained), float32 on CPU (bf16 matmuls are slow and inexact there)."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def dtype_from_name(name: str | None, device: str) -> torch.dtype:
    if name in (None, "", "auto"):
        return default_dtype(device)
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"--dtype {name!r} is not one of {sorted(table)} or 'auto'")
    return table[name]


def pick_attn_implementation(device: str, requested: str | None = None) -> str:
    if requested not in (None, "", "auto"):
        return requested
    # FlashAttention 2's compiled extension, not the ``flash_attn`` name alone: flash-attn-4
    # installs ``flash_attn.cute`` without it, and transformers then refuses flash_attention_2
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn_2_cuda") is not None:
        return "flash_attention_2"
    return "sdpa"


def fetch_model(name_or_path: str, endpoint_url: str | None = None, cache_dir: str | None = None,
                cancel: threading.Event | None = None) -> str:
    """Return something ``from_pretrained`` can open.

    Hub names and local directories pass through. Object-store URIs (s3://, gs://) are
    copied once per node into ``cache_dir`` (default ``$VDR_MODEL_CACHE`` or
    ``/tmp/vdr-models``): a file lock makes the actors of one node share one copy, and the
    copy is renamed into place only when complete, so a crashed copy is never used: a copy that
    fails (or is cancelled through ``cancel``) removes its partial folder, and one left by a
    killed process is removed by the next copy of the same model. The files are read in 64 MiB
    ranged pieces, ``$VDR_MODEL_FETCH_THREADS`` (default 8) at once, so up to 8 x 64 MiB of
    buffers (:func:`pipeline.storage.download_files`):
    one sequential stream of 8 MiB reads, as until 2026-12-05, copied a 0.67 GB checkpoint from
    moto's server on 127.0.0.1 at 23-24 MB/s, the pieces at 155-164 MB/s (dev machine, 2 cores;
    moto, not S3: RESULTS "Twenty-first session"). A progress line is logged every 10 s.
    """
    if "://" not in name_or_path or name_or_path.startswith("file://"):
        return name_or_path.removeprefix("file://")
    import pyarrow.fs as pafs

    from pipeline import storage
    from pipeline.storage import open_filesystem

    cache_dir = cache_dir or os.environ.get("VDR_MODEL_CACHE", os.path.join(tempfile.gettempdir(), "vdr-models"))
    os.makedirs(cache_dir, exist_ok=True)
    key = hashlib.sha1(name_or_path.encode()).hexdigest()[:16]
    final = os.path.join(cache_dir, key)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(final):
            return final
        # Only the holder of this model's lock writes its partial folders: any there now were
        # left by a process killed while copying (a flock ends with its holder)
        for stale in glob.glob(os.path.join(cache_dir, f".partial-{key}-*")):
            shutil.rmtree(stale, ignore_errors=True)
        fs, root = open_filesystem(name_or_path, endpoint_url)
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except FileNotFoundError:
            infos = []
        files = [i for i in infos if i.type == pafs.FileType.File]
        if not files:
            raise FileNotFoundError(f"no model files under {name_or_path}: expected config.json and weights "
                                    "(the folder that save_pretrained wrote, copied whole); check the --model URI")
        rels = [posixpath.relpath(info.path, root) for info in files]
        bad = [info.path for info, rel in zip(files, rels)
               if rel.startswith("/") or ".." in rel.split("/") or "\\" in rel]
        if bad:
            # An object key with ".." would be written outside the cache folder.
            raise ValueError(f"refusing to copy model {name_or_path}: object key(s) {bad[:3]} point outside "
                             "the model folder; remove them from the bucket")
        staging = tempfile.mkdtemp(dir=cache_dir, prefix=f".partial-{key}-")
        total = sum(info.size for info in files)
        t0 = time.monotonic()
        said = [t0]

        def progress(done: int, total: int) -> None:  # from the copy's threads
            now = time.monotonic()
            if now - said[0] >= FETCH_PROGRESS_S and done < total:
                said[0] = now
                log.info("copying model %s: %.2f of %.2f GB, %.0f MB/s", name_or_path, done / 1e9, total / 1e9,
                         done / 1e6 / (now - t0))

        try:
            storage.download_files(fs, [(info.path, info.size, os.path.join(staging, rel))
                                        for info, rel in zip(files, rels)], threads=fetch_threads(), progress=progress,
                                   cancel=cancel)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.rename(staging, final)
        took = time.monotonic() - t0
        log.info("copied model %s to %s (%d files, %.2f GB in %.1f s, %.0f MB/s)", name_or_path, final, len(files),
                 total / 1e9, took, total / 1e6 / max(took, 1e-6))
        return final


FETCH_THREADS_ENV = "VDR_MODEL_FETCH_THREADS"
FETCH_PROGRESS_S = 10.0


def fetch_threads() -> int:
    """Ranged reads at once when copying a model from object storage (``$VDR_MODEL_FETCH_THREADS``,
    default 8)."""
    raw = os.environ.get(FETCH_THREADS_ENV, "8")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{FETCH_THREADS_ENV}={raw!r}: give a whole number of at least 1 (default 8)")
    return n


class BackgroundFetch:
    """:func:`fetch_model` running on a daemon thread (:func:`fetch_model_in_background`):
    :meth:`result` waits for the local path (or raises the copy's error); :meth:`cancel` stops a
    copy its caller no longer needs (its partial folder is removed)."""

    def __init__(self, name_or_path: str, endpoint_url: str | None):
        import concurrent.futures

        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._cancel = threading.Event()
        if "://" not in name_or_path or name_or_path.startswith("file://"):  # no copy: no thread
            self._future.set_result(fetch_model(name_or_path, endpoint_url))
            return

        def run() -> None:
            try:
                self._future.set_result(fetch_model(name_or_path, endpoint_url, cancel=self._cancel))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._future.set_exception(exc)

        threading.Thread(target=run, name="fetch-model", daemon=True).start()

    def result(self) -> str:
        return self._future.result()

    def cancel(self) -> None:
        self._cancel.set()


def fetch_model_in_background(name_or_path: str, endpoint_url: str | None = None) -> BackgroundFetch:
    """:func:`fetch_model` on a daemon thread, so that an object-store copy runs while the caller
    imports transformers (its 2-5 s are the longer part of an actor's start where the copy is
    short). Hub names and local paths need no copy: no thread. (Reading a local checkpoint into
    the page cache on a thread meanwhile was tried and dropped: its load 1.6 s shorter with only
    the weights evicted, but 5 s longer until the weights were read on a wholly cold page cache,
    on the development machine's disk; RESULTS "Twenty-first session", commit ``866ac7f``.)"""
    return BackgroundFetch(name_or_path, endpoint_url)


class _VisionLengths:
    """Patches per image of the batch being embedded, known on the host before the forward
    (an int64 CPU tensor: a list would make torch.compile specialize on its values)."""

    lengths: torch.Tensor | None = None


@dataclasses.dataclass
class LoadedModel:
    model: "torch.nn.Module"
    processor: object
    name: str
    device: str
    dtype: torch.dtype
    image_token_id: int
    pad_token_id: int
    image_prefix_ids: list[int]
    image_suffix_ids: list[int]
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: torch.Tensor
    image_std: torch.Tensor
    rescale_factor: float
    vision_lengths: _VisionLengths = dataclasses.field(default_factory=_VisionLengths)
    precision: str = "default"  # or "fp8": the large matmuls in FP8 (pipeline.embed.fp8)
    rope_cache: dict = dataclasses.field(default_factory=dict)  # (grids, length) -> position ids
    # seconds of each step of load_model (import, fetch, from_pretrained, to_device, processor,
    # setup): where an actor's start-up goes
    load_phases: dict = dataclasses.field(default_factory=dict)
    precompiled: list = dataclasses.field(default_factory=list)  # pipeline.embed.precompile.PrecompiledForward
    linear_patch_embed: bool = False  # the patch embedding runs as one matmul (enable_linear_patch_embed)
    image_attention_op: bool = False  # the vision attention runs through vdr::image_attention

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
    endpoint_url: str | None = None,
    batched_vision_attention: bool = True,
    compile_model: bool = False,
    precision: str = "default",
    compile_backend: str = "inductor",
    precompiled: bool | None = None,
    linear_patch_embed: bool | None = None,
    layers: int | None = None,
) -> LoadedModel:
    """Load ``ColQwen2ForRetrieval`` + ``ColQwen2Processor`` (ColQwen2.5 ports too).

    ``load_in_4bit`` is kept for benchmarks/bench_4bit.py only (the jobs no longer offer it).
    ``precision="fp8"`` runs the large matmuls in FP8 (:mod:`pipeline.embed.fp8`).
    ``compile_backend``: torch.compile's backend for ``compile_model`` (tests use ``"eager"``:
    Dynamo's graphs and guards, without Inductor's code generation). ``precompiled``: compile
    each block type ahead of time (:mod:`pipeline.embed.precompile`: serializable, so a warm
    start skips tracing); False: ``torch.compile`` on each block, as before 2026-12-05; None:
    True unless the environment sets ``VDR_PRECOMPILE=0``. ``linear_patch_embed``: the vision
    tower's patch embedding as one matmul (:func:`enable_linear_patch_embed`); None: True unless
    the environment sets ``VDR_LINEAR_PATCH_EMBED=0``. ``layers``: build the checkpoint's
    architecture with this many vision blocks and text layers and random weights, instead of
    loading its weights (:mod:`pipeline.embed.compile_helper`: the blocks' compiled code does not
    depend on the weights' values or on how many blocks there are)."""
    # the environment's switches first: a misspelt one is refused before the weights load
    if linear_patch_embed is None:
        linear_patch_embed = env_flag("VDR_LINEAR_PATCH_EMBED", True)
    if precompiled is None and compile_model:
        precompiled = env_flag("VDR_PRECOMPILE", True)
    if compile_model:
        from pipeline.embed import inductor_heuristics

        persistent_norms = inductor_heuristics.persistent_norms_requested()
    # before any op that may run on several threads: MKL's VML picks its kernels at first use
    warm_up_mkl_vml()
    phases: dict[str, float] = {}
    mark = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - mark[0], 3)
        mark[0] = now

    from pipeline.embed import fp8

    # every setting checked before an object-store copy starts
    device = resolve_device(device)
    if precision not in fp8.PRECISIONS:
        raise ValueError(f"--precision must be one of {fp8.PRECISIONS}, got {precision!r}")
    if precision == "fp8" and device.startswith("cuda") and not fp8.fp8_matmul_supported(device):
        raise ValueError(f"--precision fp8 needs FP8 tensor cores (CUDA compute capability 8.9+: L4, L40S, H100, "
                         f"H200); {torch.cuda.get_device_name(device)} has "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}. Drop --precision fp8")
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else dtype_from_name(dtype, device)
    attn = pick_attn_implementation(device, attn_implementation)
    # An object-store checkpoint is copied to this node while transformers is imported
    fetching = fetch_model_in_background(name_or_path, endpoint_url)
    try:
        from transformers import ColQwen2ForRetrieval, ColQwen2Processor
    except BaseException:
        fetching.cancel()
        raise
    phase("import")
    path = fetching.result()
    phase("fetch")  # what the copy took beyond the import
    kwargs: dict = {"dtype": torch_dtype, "attn_implementation": attn}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        # The 128-d projection stays in the compute dtype: ColQwen2's forward casts the hidden
        # states to that layer's weight dtype, which is uint8 for a 4-bit layer (measured on an
        # H200, 2026-12-03: "linalg.vector_norm ... Got Byte" on the first batch).
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype, bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=["embedding_proj_layer"],
        )
        kwargs["device_map"] = device
    try:
        if layers is not None:
            model = _random_model(ColQwen2ForRetrieval, path, layers, torch_dtype, attn, device)
        else:
            model = ColQwen2ForRetrieval.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise OSError(
            f"could not load a ColQwen2 checkpoint from {name_or_path!r}: {exc}. Pass --model a hub "
            "name (needs network), a local directory with config.json + weights, or an s3:// / gs:// "
            "prefix holding them; `python -m jobs.build_tiny_model` writes a tiny offline one."
        ) from exc
    phase("from_pretrained")
    if not load_in_4bit:
        model = model.to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    phase("to_device")
    model.eval()
    processor = ColQwen2Processor.from_pretrained(path)
    phase("processor")
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    before, after = IMAGE_PROMPT.split(IMAGE_TOKEN)
    ip = processor.image_processor
    lm = LoadedModel(
        model=model,
        processor=processor,
        name=name_or_path,
        device=device,
        dtype=torch_dtype,
        image_token_id=image_token_id,
        pad_token_id=tok.pad_token_id,
        image_prefix_ids=tok(before, add_special_tokens=False)["input_ids"],
        image_suffix_ids=tok(after, add_special_tokens=False)["input_ids"],
        patch_size=int(ip.patch_size),
        temporal_patch_size=int(ip.temporal_patch_size),
        merge_size=int(ip.merge_size),
        image_mean=torch.tensor(ip.image_mean, dtype=torch.float32, device=device),
        image_std=torch.tensor(ip.image_std, dtype=torch.float32, device=device),
        rescale_factor=float(ip.rescale_factor),
    )
    # Qwen2.5-VL's vision tower attends within windows (cu_seqlens are not per image), so
    # the per-image batching applies to Qwen2-VL only.
    if precision == "fp8":
        n = fp8.convert_to_fp8(model)
        log.info("--precision fp8: %d linear layers run as FP8 matmuls%s", n,
                 "" if device.startswith("cuda") else " (emulated in float32 on CPU: slow, for tests)")
    lm.precision = precision
    # vdr::image_attention computes the vision attention (SDPA, or FA4: pipeline.embed.vision_kernels)
    lm.image_attention_op = bool(batched_vision_attention and attn == "sdpa"
                                 and model.config.vlm_config.model_type == "qwen2_vl")
    if lm.image_attention_op:
        enable_batched_vision_attention(model, lm.vision_lengths)
    lm.linear_patch_embed = linear_patch_embed and enable_linear_patch_embed(model)
    if compile_model:
        # Per block, not the whole model: the blocks are where the time goes (elementwise
        # chains around the matmuls that eager mode runs as separate kernels), and their
        # shapes change only with the batch's page sizes: dynamic=True, and the vision
        # attention an opaque operator (vdr::image_attention), so that a batch of other page
        # sizes runs the same compiled blocks. Until 2026-12-04 the vision blocks were
        # compiled again for every new mix of page sizes, until torch's limit of 8 versions,
        # and ran eagerly after it (tests/embed/test_model.py).
        # Each block type is compiled ahead of time by torch (pipeline.embed.precompile), so a
        # warm actor loads the compiled blocks instead of tracing them again (compile_cache).
        from pipeline.embed import inductor_heuristics, precompile

        if persistent_norms:  # on by default; VDR_PERSISTENT_NORMS=0 turns it off
            inductor_heuristics.install_persistent_norms()
        visual = getattr(model.vlm, "visual", None) or model.vlm.model.visual
        text = getattr(model.vlm, "language_model", None) or model.vlm.model.language_model
        if precompiled:
            lm.precompiled = [
                precompile.install(visual.blocks, "vision_block", compile_backend,
                                   external={"vision_lengths": lm.vision_lengths}),
                precompile.install(text.layers, "text_layer", compile_backend)]
        else:
            for blk in list(visual.blocks) + list(text.layers):
                blk.compile(dynamic=True, backend=compile_backend)
    phase("setup")
    lm.load_phases = phases
    log.info("loaded %s on %s (%s, precision=%s, attn=%s, 4bit=%s, batched vision attention=%s, compiled=%s); "
             "seconds: %s", name_or_path, device, lm.dtype_name, precision, attn, load_in_4bit,
             batched_vision_attention, compile_model, phases)
    return lm


def _random_model(cls, path: str, layers: int, dtype: torch.dtype, attn: str, device: str):
    """``cls``'s architecture from the config at ``path``, cut to ``layers`` vision blocks and text
    layers, with random weights made on ``device`` (no checkpoint read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    vlm = config.vlm_config
    text = getattr(vlm, "text_config", vlm)
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:layers]
    vlm.vision_config.depth = layers
    if isinstance(getattr(vlm.vision_config, "fullatt_block_indexes", None), list):  # Qwen2.5-VL
        vlm.vision_config.fullatt_block_indexes = [i for i in vlm.vision_config.fullatt_block_indexes if i < layers]
    with torch.device(device):
        return cls._from_config(config, dtype=dtype, attn_implementation=attn)


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """[a, a, b, a] -> [(a, 2), (b, 1), (a, 1)]: consecutive equal lengths."""
    out: list[tuple[int, int]] = []
    for n in lengths:
        if out and out[-1][0] == n:
            out[-1] = (n, out[-1][1] + 1)
        else:
            out.append((n, 1))
    return out


# How the images of one size in a batch are grouped into SDPA calls (:func:`image_attention`):
# "pow2" (the default since 2026-12-05): each run of equal-size images cut into powers of two
# (7 images: 4 + 2 + 1), so that at most log2(batch size) + 1 call shapes exist per page size;
# "runs": one call per run, its batch the run's length (up to batch size x page sizes shapes).
# Why: SDPA's cuDNN backend (the one it picks for this head size on an H200) builds an execution
# plan for each new (images, patches) shape, 38-70 ms each (bench_sdpa_shapes.py; the flash and
# efficient backends pay nothing), and batches of random page-size mixes kept meeting new shapes:
# 53.6 pages/s with "runs" against 58.5 with "pow2" and 63.0 for letter pages only (H200,
# 2026-12-05, RESULTS fourteenth session); batches without a new shape take the same time either
# way. ``VDR_IMAGE_ATTENTION_SPLIT=runs`` restores the old grouping.
IMAGE_ATTENTION_SPLIT = os.environ.get("VDR_IMAGE_ATTENTION_SPLIT", "pow2").strip().lower()
if IMAGE_ATTENTION_SPLIT not in ("pow2", "runs"):  # refused at import, not at the first batch
    raise ValueError(f"VDR_IMAGE_ATTENTION_SPLIT={IMAGE_ATTENTION_SPLIT!r}: use pow2 (the default) or runs")
# (images, patches) of every SDPA call made by image_attention in this process, so benchmarks
# can tell how many shapes a batch met for the first time.
IMAGE_ATTENTION_SHAPES: set[tuple[int, int]] = set()


def _attention_calls(lengths: list[int], split: str = "runs") -> list[tuple[int, int]]:
    """(patches, images) of each SDPA call for images of ``lengths`` patches, in order."""
    calls = []
    for length, count in _runs(lengths):
        if split == "pow2":
            while count:
                part = 1 << (count.bit_length() - 1)
                calls.append((length, part))
                count -= part
        elif split == "runs":
            calls.append((length, count))
        else:
            raise ValueError(f"IMAGE_ATTENTION_SPLIT must be 'runs' or 'pow2', got {split!r}")
    return calls


def _image_lengths(lengths: torch.Tensor | None, cu_seqlens: torch.Tensor, seq_length: int) -> list[int]:
    """Patches per image: the host's (``lengths``), else from ``cu_seqlens`` (a device sync)."""
    if lengths is not None:
        out = lengths.tolist()
        if sum(out) == seq_length:
            return out
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


@torch.library.custom_op("vdr::image_attention", mutates_args=())
def image_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None,
                    cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention within each image of a batch, all images of one size in one SDPA call.
    ``q``, ``k``, ``v``: (patches, heads, dim), the images one after another; ``lengths``:
    patches per image (int64, on the host; None: from ``cu_seqlens``). Returns (patches,
    heads * dim). A custom operator, so that torch.compile neither traces into it nor
    specializes on the page sizes (they change from batch to batch)."""
    import torch.nn.functional as F

    from pipeline.embed import vision_kernels

    attend = vision_kernels.ACTIVE["attend"]  # FlashAttention 4 once an actor has loaded it
    if attend is not None:
        try:
            return attend(q, k, v, lengths, cu_seqlens, scale)
        except torch.OutOfMemoryError:  # the batch's, not FA4's: SDPA would need the memory too
            raise
        except Exception as exc:  # noqa: BLE001 - SDPA from now on, this call included (said in the summary)
            vision_kernels.runtime_failure(exc)
    outs, start = [], 0
    for length, count in _attention_calls(_image_lengths(lengths, cu_seqlens, q.shape[0]), IMAGE_ATTENTION_SPLIT):
        IMAGE_ATTENTION_SHAPES.add((count, length))
        n = length * count
        qs, ks, vs = (t[start : start + n].view(count, length, t.shape[1], -1).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)  # (count, heads, length, dim)
        outs.append(o.transpose(1, 2).reshape(n, -1))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@image_attention.register_fake
def _image_attention_shape(q, k, v, lengths, cu_seqlens, scale):
    return q.new_empty((q.shape[0], q.shape[1] * v.shape[2]))


def _batched_vision_attention(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None,
                               **kwargs):
    """The vision attention's forward set by :func:`enable_batched_vision_attention`."""
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = self._vdr_rotary(q, k, cos, sin)
    if self._vdr_attend is None:
        # One opaque operation for torch.compile: the lengths stay a tensor, so a batch of
        # other page sizes runs the same compiled block (no recompilation per batch).
        return self.proj(torch.ops.vdr.image_attention(q, k, v, self._vdr_lengths.lengths, cu_seqlens, self.scaling))
    lengths = _image_lengths(self._vdr_lengths.lengths, cu_seqlens, seq_length)
    outs, start = [], 0
    for length, count in _runs(lengths):
        n = length * count
        outs.append(self._vdr_attend(*(t[start : start + n].view(count, length, self.num_heads, -1)
                                       for t in (q, k, v)), self.scaling))
        start += n
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return self.proj(out)


# A bound method is pickled (with a precompiled block's guards) as getattr(module, __name__)
_batched_vision_attention.__name__ = "forward"


def enable_batched_vision_attention(model, holder: _VisionLengths, attend=None) -> int:
    """Make the vision tower attend over all equal-size images in one SDPA call.

    With sdpa, transformers' Qwen2-VL vision attention splits the sequence per image with a
    ``cu_seqlens.tolist()`` device sync and one SDPA call per image, in each of its 32
    layers. Images of one size are independent blocks of equal length, so a reshape to
    (images, heads, length, dim) computes exactly the same attention in one call, with no
    sync (lengths come from the host). Same maths; tests compare it with the original.
    ``attend(q, k, v, scale)``, given (images, length, heads, dim) views and returning
    (images * length, heads * dim), replaces SDPA: benchmarks try other kernels through it
    (benchmarks/vision_attention_triton.py). Returns the number of attention modules changed.
    """
    import types

    visual = getattr(model.vlm, "visual", None) or model.vlm.model.visual
    module = importlib.import_module(type(visual.blocks[0].attn).__module__)
    count = 0
    for blk in visual.blocks:
        # what the forward needs is on the module, not in a closure: a closure's cells are
        # not found again when a precompiled block's guards are loaded (pipeline.embed.precompile)
        blk.attn._vdr_lengths = holder
        blk.attn._vdr_attend = attend
        blk.attn._vdr_rotary = module.apply_rotary_pos_emb_vision
        blk.attn.forward = types.MethodType(_batched_vision_attention, blk.attn)
        count += 1
    return count


def _linear_patch_embed(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The patch embedding's forward set by :func:`enable_linear_patch_embed`."""
    w = self.proj.weight  # (embed_dim, channels, temporal, patch, patch)
    x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
    return torch.nn.functional.linear(x, w.reshape(w.shape[0], -1), self.proj.bias)


_linear_patch_embed.__name__ = "forward"


def enable_linear_patch_embed(model) -> bool:
    """Run the vision tower's patch embedding as one matmul instead of a Conv3d.

    Qwen2-VL's (and Qwen2.5-VL's) patch embedding is a Conv3d whose kernel equals its stride
    and covers each whole patch (3 x 2 x 14 x 14 = 1,176 values -> 1,280), applied to patches
    that are already cut out: exactly a linear layer over the flattened patch, with the conv's
    weight read as (1,280, 1,176). Same sums, in another order (bf16 rounding apart; tests
    compare it with the Conv3d). Why: on an H200, cuDNN ran this conv as
    ``implicit_convolveNd_sgemm`` at 12.3 ms per batch of 32 letter pages, ~2.5% of the
    compiled actor's GPU time (profile of 2026-12-04, RESULTS ninth session), for 0.3 TFLOP
    that a cuBLAS matmul does in well under a millisecond; the actor 1.85-1.9% faster with it
    (H200, 2026-12-05, two calls, RESULTS fourteenth session). Returns whether
    the module was changed (False for a patch embedding of another form)."""
    import types

    visual = getattr(model.vlm, "visual", None) or model.vlm.model.visual
    pe = getattr(visual, "patch_embed", None)
    conv = getattr(pe, "proj", None)
    # exactly a Conv3d with a plain weight: not a subclass with its own forward, not a quantized
    # or otherwise wrapped tensor
    if type(conv) is not torch.nn.Conv3d or type(conv.weight.data) is not torch.Tensor:
        return False
    if (tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding not in ((0, 0, 0), "valid")
            or tuple(conv.dilation) != (1, 1, 1) or conv.groups != 1):
        return False
    pe.forward = types.MethodType(_linear_patch_embed, pe)
    return True


def _rope_index(vlm, input_ids, mm_token_type_ids, image_grid_thw, attention_mask) -> torch.Tensor:
    """3-D M-RoPE positions, (3, B, L). Runs on CPU tensors: it loops in Python per sample."""
    get = getattr(vlm, "get_rope_index", None) or vlm.model.get_rope_index
    return get(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
    )[0]


def patchify(images: torch.Tensor, lm: LoadedModel) -> torch.Tensor:
    """(N, H, W, 3) uint8 images of one size -> (N, grid_h*grid_w, 3*T*P*P) normalized patches.

    The same rescale -> normalize -> patch order as ``Qwen2VLImageProcessor`` (PIL backend).
    """
    n, h, w, _ = images.shape
    p, t, m = lm.patch_size, lm.temporal_patch_size, lm.merge_size
    x = images.to(torch.float32) * lm.rescale_factor
    x = (x - lm.image_mean) / lm.image_std  # (N, H, W, C)
    x = x.permute(0, 3, 1, 2)  # (N, C, H, W)
    x = x.unsqueeze(1).expand(n, t, 3, h, w)  # a still image is repeated over the temporal patch
    gh, gw = h // p, w // p
    x = x.reshape(n, t, 3, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(n, gh * gw, 3 * t * p * p)


def prepare_page_inputs(images: Sequence[np.ndarray], lm: LoadedModel, pin: bool = False) -> dict:
    """The host half of :func:`build_page_inputs`: token ids, mask, M-RoPE positions and the
    images stacked by size, all CPU tensors (``pin``: in pinned memory, so the copies to the
    device do not block the host). Touches no device: it can run while another batch's
    forward pass is on the GPU. ``"lengths"`` holds each row's real length (a list)."""
    p, m = lm.patch_size, lm.merge_size
    sizes = [tuple(im.shape[:2]) for im in images]
    grids = [(1, h // p, w // p) for h, w in sizes]
    n_img = [gh * gw // (m * m) for _, gh, gw in grids]
    seqs = [lm.image_prefix_ids + [lm.image_token_id] * k + lm.image_suffix_ids for k in n_img]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), lm.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    image_grid_thw = torch.tensor(grids, dtype=torch.long)
    # M-RoPE positions depend only on the pages' grids (and the padded length): the job's
    # batches repeat a few page sizes, so they are computed once per batch shape.
    key = (tuple(grids), length)
    position_ids = lm.rope_cache.get(key)
    if position_ids is None:
        mm = (input_ids == lm.image_token_id).int()
        position_ids = _rope_index(lm.model.vlm, input_ids, mm, image_grid_thw, attention_mask)
        if len(lm.rope_cache) >= 64:  # each entry (3, B, L) int64: ~300 KB at B=16, L=790
            lm.rope_cache.clear()
        lm.rope_cache[key] = position_ids
    by_size: dict[tuple, list[int]] = {}
    for i, s in enumerate(sizes):
        by_size.setdefault(s, []).append(i)
    stacks = []
    for (h, w), idx in by_size.items():
        stack = torch.empty((len(idx), h, w, 3), dtype=torch.uint8, pin_memory=pin)
        np.stack([np.asarray(images[i]) for i in idx], out=stack.numpy())
        stacks.append((idx, stack))
    host = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "image_grid_thw": image_grid_thw}
    if pin:
        host = {k: v.pin_memory() for k, v in host.items()}
    return {**host, "stacks": stacks, "lengths": [len(s) for s in seqs],
            "max_patches": max(g[1] * g[2] for g in grids)}


def page_inputs_to_device(host: dict, lm: LoadedModel) -> dict:
    """The device half of :func:`build_page_inputs`: copies (asynchronous from pinned memory)
    and patchify, queued on the current stream; no host sync."""
    dim = 3 * lm.temporal_patch_size * lm.patch_size * lm.patch_size
    stacks = host["stacks"]
    if len(stacks) == 1:  # pages of one size (the usual batch): no scatter, no padding
        pixel_values = patchify(stacks[0][1].to(lm.device, non_blocking=True), lm)
    else:
        pixel_values = torch.zeros((len(host["lengths"]), host["max_patches"], dim), dtype=torch.float32,
                                   device=lm.device)
        for idx, stack in stacks:
            patches = patchify(stack.to(lm.device, non_blocking=True), lm)
            # a device index: a Python list would be copied to the device with a stream sync,
            # waiting for the other batch's forward pass
            rows = torch.tensor(idx, dtype=torch.long)
            rows = (rows.pin_memory() if stack.is_pinned() else rows).to(lm.device, non_blocking=True)
            pixel_values[rows, : patches.shape[1]] = patches
    return {
        "input_ids": host["input_ids"].to(lm.device, non_blocking=True),
        "attention_mask": host["attention_mask"].to(lm.device, non_blocking=True),
        "position_ids": host["position_ids"].to(lm.device, non_blocking=True),
        "pixel_values": pixel_values.to(lm.dtype),
        "image_grid_thw": host["image_grid_thw"].to(lm.device, non_blocking=True),
    }


def build_page_inputs(images: Sequence[np.ndarray], lm: LoadedModel) -> dict:
    """Model inputs for page images already on the model's grid (H, W multiples of 28).

    Pages are grouped by size so each group is patchified in one tensor op; sequences are
    right-padded to the longest page of the batch (attention mask and explicit positions
    make padding inert). Returns tensors on ``lm.device``.
    """
    return page_inputs_to_device(prepare_page_inputs(images, lm), lm)


def build_query_inputs(texts: Sequence[str], lm: LoadedModel) -> dict:
    tok = lm.processor.tokenizer
    prompts = [QUERY_PROMPT.format(text=t) for t in texts]
    enc = tok(prompts, add_special_tokens=False, padding="longest", padding_side="right", return_tensors="pt")
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    position_ids = _rope_index(lm.model.vlm, input_ids, torch.zeros_like(input_ids, dtype=torch.int), None, attention_mask)
    return {
        "input_ids": input_ids.to(lm.device),
        "attention_mask": attention_mask.to(lm.device),
        "position_ids": position_ids.to(lm.device),
    }


class ForwardTimer:
    """Seconds spent in the model's forward passes: CUDA events around each pass on a GPU
    (the time the GPU spent from the pass's first kernel to its last; with ``--pool-factor``
    the pooling's distance kernels after it too), the host clock on CPU.
    Input building and the copy back are outside, so ``busy_s`` over wall time is how busy
    the GPU was kept. Thread-safe: with two batches in flight each thread also keeps its own
    total (``thread_busy_s``), so a batch's share is read in the thread that ran it."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.busy_s = 0.0
        self.passes = 0
        # host seconds of --pool-factor's second half, off the device lock: the wait for Ward's
        # merge loops (in worker processes: pipeline.embed.pooling.WardMerges) and the cluster
        # means; benchmarks read them
        self.pool_host_s = {"merge": 0.0, "means": 0.0}
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def thread_busy_s(self) -> float:
        return getattr(self._local, "busy_s", 0.0)

    def add_pool_host(self, merge_s: float, means_s: float) -> None:
        with self._lock:
            self.pool_host_s["merge"] += merge_s
            self.pool_host_s["means"] += means_s

    def add(self, seconds: float) -> None:
        with self._lock:
            self.busy_s += seconds
            self.passes += 1
        self._local.busy_s = self.thread_busy_s + seconds

    @contextlib.contextmanager
    def measure(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            self.add(start.elapsed_time(end) / 1000.0)
        else:
            t = time.perf_counter()
            yield
            self.add(time.perf_counter() - t)


class TurnLock:
    """A lock taken in the order asked for (tickets). ``threading.Lock`` is not fair: a thread
    that releases it and asks again at once usually wins, so with two batches in flight one
    thread could queue batch after batch while the other, already prepared, waits (seen in
    the CPU test). Here the waiting thread goes next."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next = 0
        self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()
        return False


class PendingEmbeddings:
    """A forward pass and its copy back, queued on the device (:func:`launch_embeddings`);
    :meth:`result` waits for them and splits the rows. With ``pool_factor`` > 1 the rows'
    condensed pooling distances came back too (``condensed``), and :meth:`result` finishes the
    pooling on the host: Ward's merge loop, the cluster means, the cast to ``out_dtype``."""

    def __init__(self, flat: torch.Tensor, lengths: list[int], done, events, timer: ForwardTimer | None,
                 pool_factor: int = 1, condensed: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32, merges=None, ward=None):
        self.flat, self.lengths, self.done, self.events, self.timer = flat, lengths, done, events, timer
        self.pool_factor, self.condensed, self.out_dtype = pool_factor, condensed, out_dtype
        self.merges = merges  # pipeline.embed.pooling.WardMerges; None: in this thread
        # (merges, flags) of Ward's merge loop made on the device (pipeline.embed.ward_triton),
        # copied back; None: the loop runs on the host, on ``condensed``
        self.ward = ward

    def result(self) -> list[np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
            if self.timer is not None:
                start, end = self.events
                self.timer.add(start.elapsed_time(end) / 1000.0)
        if self.pool_factor > 1:
            return self._pooled()
        flat = self.flat.numpy()
        out, start = [], 0
        for n in self.lengths:
            out.append(flat[start : start + n])
            start += n
        return out

    def _pooled(self) -> list[np.ndarray]:
        from pipeline.embed.pooling import WardMerges, device_labels, pool_by_labels

        t = time.perf_counter()
        if self.ward is not None:  # merged on the device: the sort, labels and fcluster here
            merges, flags = (np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a) for a in self.ward)
            all_labels = device_labels(merges, flags, list(self.lengths), self.pool_factor)
        else:  # the merge loops of all rows (in worker processes unless merges says 0 or is None)
            merges = self.merges if self.merges is not None else WardMerges(0)
            all_labels = merges.labels(self.condensed.numpy(), list(self.lengths), self.pool_factor)
        merge_s = time.perf_counter() - t  # wall seconds this thread spent on them
        t = time.perf_counter()
        out, start = [], 0
        for n, labels in zip(self.lengths, all_labels):
            x = self.flat[start : start + n].float()
            start += n
            if labels is not None:
                x = pool_by_labels(x, labels)
            out.append(x.to(self.out_dtype).numpy())
        means_s = time.perf_counter() - t
        if self.timer is not None:
            self.timer.add_pool_host(merge_s, means_s)
        return out


def without_padding_mask(inputs: dict) -> dict:
    """The page inputs without their attention mask. Rows are right-padded and the language
    model attends causally, so a real token only sees earlier tokens, all real: the mask
    changes nothing the pipeline keeps (padded rows' vectors are dropped; the M-RoPE positions
    are computed on the host, with the mask). Without it SDPA takes its causal fast path, with
    grouped-query attention, in every batch; until 2026-12-05 only batches of one page size did,
    and a mixed-size batch ran the masked path (its own compiled text-layer variant, K and V
    repeated per head). Tests compare mixed batches with the training code, page by page."""
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def launch_embeddings(lm: LoadedModel, inputs: dict, lengths: list[int], timer: ForwardTimer | None = None,
                      out_dtype: torch.dtype = torch.float32, pool_factor: int = 1, merges=None) -> PendingEmbeddings:
    """Queue the forward pass, the gather of each row's ``lengths[i]`` real vectors (right
    padding: they come first) and their copy to pinned host memory, with no host sync of
    its own (the model's forward still has a few); L2-normalised, ``out_dtype`` converted on
    the device. On CPU everything has run when it returns.

    ``pool_factor`` > 1: the vectors come back in the model's dtype (float32 on the host is
    exact), and each row's pooling distances (:func:`pipeline.embed.pooling.condensed_distances`)
    are queued on the device. Where :func:`pipeline.embed.pooling.ward_on_device` says so (a
    CUDA device with Triton), Ward's merge loop is queued on the device too, on a side stream
    (:func:`ward_on_side_stream`), and only its merges come back; else the distances are copied
    back beside the vectors. The rest of the pooling runs in :meth:`PendingEmbeddings.result`,
    on the host, after the caller has let go of the device (with the distances: Ward's merge
    loop in ``merges``' worker processes, :class:`pipeline.embed.pooling.WardMerges`; None: in
    the calling thread)."""
    from pipeline.embed import inductor_heuristics
    from pipeline.embed.pooling import check_pool_factor, ward_on_device

    check_pool_factor(pool_factor)
    inductor_heuristics.apply_in_this_thread()  # blocks compile in the thread that first calls them
    batch, length = inputs["input_ids"].shape
    inputs = without_padding_mask(inputs)
    cuda = timer.cuda if timer is not None else (str(lm.device).startswith("cuda") and torch.cuda.is_available())
    index = torch.cat([torch.arange(n, dtype=torch.long) + i * length for i, n in enumerate(lengths)])
    with torch.inference_mode():
        if cuda:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
            out = lm.model(**inputs, use_cache=False).embeddings  # (B, L, 128)
            if pool_factor == 1:
                events[1].record()
            dev = out.reshape(batch * length, -1).index_select(0, index.pin_memory().to(out.device, non_blocking=True))
            copy_dtype = out_dtype if pool_factor == 1 else dev.dtype
            flat = torch.empty(dev.shape, dtype=copy_dtype, pin_memory=True)
            flat.copy_(dev.to(copy_dtype), non_blocking=True)
            condensed = None
            if pool_factor > 1 and ward_on_device(out.device):
                on_device = _device_pooling(dev, lengths, side_stream=True)  # None: failed, host from now on
                if on_device is not None:
                    events[1].record()  # the distances count as GPU-busy; the merge loop runs beside
                    merges_host, flags_host, done = on_device
                    return PendingEmbeddings(flat, lengths, done, events, timer, pool_factor, None, out_dtype,
                                             merges, ward=(merges_host, flags_host))
            if pool_factor > 1:
                condensed = torch.empty(condensed_size(lengths), dtype=torch.float64, pin_memory=True)
                pooling_distances(dev, lengths, out=condensed)
                events[1].record()  # the pooling's device work counts as GPU-busy too
            done = torch.cuda.Event(blocking=True)  # waiting on it sleeps instead of spinning a core
            done.record()
            return PendingEmbeddings(flat, lengths, done, events, timer, pool_factor, condensed, out_dtype, merges)
        # on CPU the pooling on the device only with VDR_WARD_ON_DEVICE=1 (Triton's interpreter: tests)
        with timer.measure() if timer is not None else contextlib.nullcontext():
            out = lm.model(**inputs, use_cache=False).embeddings
            dev = out.reshape(batch * length, -1).index_select(0, index.to(out.device))
            on_device = None
            if pool_factor > 1 and ward_on_device(lm.device):
                on_device = _device_pooling(dev, lengths, side_stream=False)
            dist = pooling_distances(dev, lengths) if pool_factor > 1 and on_device is None else None
        if pool_factor == 1:
            return PendingEmbeddings(dev.to(out_dtype).cpu(), lengths, None, None, timer)
        if on_device is not None:
            return PendingEmbeddings(dev.cpu(), lengths, None, None, timer, pool_factor, None, out_dtype, merges,
                                     ward=on_device)
        return PendingEmbeddings(dev.cpu(), lengths, None, None, timer, pool_factor, dist.cpu(), out_dtype, merges)


def _device_pooling(dev: torch.Tensor, lengths: list[int], side_stream: bool):
    """The pooling's distances and merge loop queued on ``dev``'s device
    (:mod:`pipeline.embed.ward_triton`): ``(merges, flags, done)`` on a side stream
    (:func:`ward_on_side_stream`), or ``(merges, flags)`` in line. None when queueing them failed
    (a Triton that cannot compile for this GPU, for one): the error is logged once and this
    process pools on the host from then on (:func:`pipeline.embed.pooling.give_up_device_pooling`),
    so the batch and the job go on."""
    from pipeline.embed import pooling, ward_triton

    try:
        dist = ward_triton.pooling_distances(dev, lengths)  # tiled, in scipy's pdist order
        if side_stream:
            return ward_on_side_stream(dist, lengths)
        return ward_triton.ward_merges(dist, lengths)
    except Exception as exc:  # noqa: BLE001 - the host path computes the same labels
        pooling.give_up_device_pooling(exc)
        return None


_SIDE_STREAMS: dict = {}
_SIDE_STREAMS_LOCK = threading.Lock()


def _side_stream(device: torch.device):
    with _SIDE_STREAMS_LOCK:
        if device not in _SIDE_STREAMS:
            _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
        return _SIDE_STREAMS[device]


def ward_on_side_stream(dist: torch.Tensor, lengths: list[int]):
    """Queue Ward's merge loop (:func:`pipeline.embed.ward_triton.ward_merges`) on a stream of its
    own, after the work queued so far on the current stream (the forward, the copy of the
    vectors back, the distances ``dist``), and the copy of its merges back to pinned host memory.
    The next batch's forward, queued on the current stream, runs meanwhile: the kernel uses one
    multiprocessor per page. Returns ``(merges, flags, done)``: host tensors, valid once the event
    ``done`` has completed (which also means all the work queued before it)."""
    from pipeline.embed.ward_triton import ward_merges

    ready = torch.cuda.Event()
    ready.record()
    side = _side_stream(dist.device)
    with torch.cuda.stream(side):
        side.wait_event(ready)
        dist.record_stream(side)  # the allocator keeps it until the side stream is done with it
        made, flags = ward_merges(dist, lengths)
        merges_host = torch.empty(made.shape, dtype=made.dtype, pin_memory=True)
        flags_host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        merges_host.copy_(made, non_blocking=True)
        flags_host.copy_(flags, non_blocking=True)
        done = torch.cuda.Event(blocking=True)
        done.record(side)
    return merges_host, flags_host, done


def condensed_size(lengths: list[int]) -> int:
    """How many condensed pooling distances rows of these ``lengths`` have, all together."""
    return sum(n * (n - 1) // 2 for n in lengths)


def pooling_distances(flat: torch.Tensor, lengths: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's condensed pooling distances (rows of more than one vector), one after
    another; ``flat`` holds the rows' vectors one after another.

    Without ``out``: concatenated on ``flat``'s device. With ``out`` (a host tensor of
    :func:`condensed_size` float64, pinned for a CUDA ``flat``): each row's distances are
    copied into their slice of it as soon as they are queued, non-blocking, so the device
    holds one row's distances at a time instead of the whole batch's twice (parts and their
    concatenation: ~160 MB for 32 pages of ~800 vectors). Returns ``out``. The caller waits
    on the stream before reading it; a row's device tensor may be freed at once, as the
    caching allocator reuses its memory only for work queued later on the same stream."""
    from pipeline.embed.pooling import condensed_distances

    if out is not None and out.numel() != condensed_size(lengths):
        raise ValueError(f"out holds {out.numel()} distances; rows of lengths {lengths} have {condensed_size(lengths)}")
    parts, start, cstart = [], 0, 0
    for n in lengths:
        if n > 1:
            dist = condensed_distances(flat[start : start + n])
            if out is None:
                parts.append(dist)
            else:
                out[cstart : cstart + dist.numel()].copy_(dist, non_blocking=True)
                cstart += dist.numel()
        start += n
    if out is not None:
        return out
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=flat.device)


@torch.inference_mode()
def forward_embeddings(lm: LoadedModel, inputs: dict, timer: ForwardTimer | None = None,
                       pool_factor: int = 1, out_dtype: torch.dtype = torch.float32) -> list[np.ndarray]:
    """Run the model; return each row's real vectors, (n_i, 128) ``out_dtype``, L2-normalised;
    with ``pool_factor`` > 1 each row's vectors pooled (:mod:`pipeline.embed.pooling`, in
    float32; distances on the model's device, the rest on the host). ``out_dtype`` float16 (what
    the actor stores) is converted on the device when not pooling (half the bytes to copy back,
    no CPU conversion), and pooled vectors on the host; the values are the same either way
    (both round to nearest even)."""
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    return launch_embeddings(lm, inputs, lengths, timer, out_dtype, pool_factor).result()


def embed_pages(lm: LoadedModel, images: Sequence[np.ndarray], timer: ForwardTimer | None = None,
                pool_factor: int = 1, out_dtype: torch.dtype = torch.float32,
                device_lock: TurnLock | None = None, merges=None) -> list[np.ndarray]:
    """Page embeddings, each (n_i, 128) ``out_dtype``, in the order given (pooled by ``pool_factor``
    when > 1). Pages are run sorted by size, so images of one size sit together for the
    batched vision attention.

    ``device_lock``: two batches in flight (threads of one actor). The host work (stacking
    pixels into pinned memory, token ids, positions) and the wait for the copy back run
    outside it; the device work is queued under it, one batch at a time, so the GPU runs
    one batch while the host prepares the next and passes never interleave (each pass's
    CUDA events enclose its own kernels only).

    ``merges``: where the pooling's merge loops run (:class:`pipeline.embed.pooling.WardMerges`;
    None: in this thread)."""
    if not images:
        return []
    order = sorted(range(len(images)), key=lambda i: images[i].shape[:2])
    ordered = [images[i] for i in order]
    p = lm.patch_size
    cuda = str(lm.device).startswith("cuda") and torch.cuda.is_available()
    host = prepare_page_inputs(ordered, lm, pin=cuda)
    with device_lock if device_lock is not None else contextlib.nullcontext():
        lm.vision_lengths.lengths = torch.tensor([(im.shape[0] // p) * (im.shape[1] // p) for im in ordered])
        try:
            inputs = page_inputs_to_device(host, lm)
            pending = launch_embeddings(lm, inputs, host["lengths"], timer, out_dtype, pool_factor, merges)
        finally:
            lm.vision_lengths.lengths = None
    vectors = pending.result()  # with pool_factor > 1 the pooling's host part runs here, off the device lock
    out: list = [None] * len(images)
    for pos, i in enumerate(order):
        out[i] = vectors[pos]
    return out


def embed_queries(lm: LoadedModel, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
    """Query embeddings, each (n_i, 128) float32 over its real tokens (augmentation tokens included)."""
    result: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        result.extend(forward_embeddings(lm, build_query_inputs(chunk, lm)))
    return result


def model_metadata(lm: LoadedModel, max_visual_tokens: int) -> dict[bytes, bytes]:
    from pipeline import __version__, schema

    return {
        schema.META_MODEL: lm.name.encode(),
        schema.META_PROMPT: IMAGE_PROMPT.encode(),
        schema.META_QUERY_PROMPT: QUERY_PROMPT.encode(),
        schema.META_MAX_VISUAL_TOKENS: str(max_visual_tokens).encode(),
        schema.META_DTYPE: lm.dtype_name.encode(),
        schema.META_VERSION: __version__.encode(),
    }
