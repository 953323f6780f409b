"""Compiled blocks that a warm actor loads instead of tracing them again.

``torch.compile`` keeps Inductor's output between processes (:mod:`pipeline.embed.compile_cache`),
but every new process still traces each block's Python with Dynamo and looks its graphs up in
those caches: 1.6-1.9 s of tracing and 1.4-1.9 s of cache lookups of a warm actor's 4.0-4.9 s
first batch on an H200 (RESULTS.md, tenth session). torch's ahead-of-time compilation
(``torch.compile(fn, fullgraph=True).aot_compile(example_inputs)``, torch >= 2.10) returns a
compiled function with its guards that can be serialized whole; loading it skips both.

:class:`PrecompiledForward` is one block type's forward (every vision block shares one, every
text layer another: the module is an argument, its weights graph inputs). A call runs the
first compiled variant whose guards accept the inputs (shapes are dynamic; a batch of one page,
or a text layer with a padding mask, gets a variant of its own) and compiles a new variant only
when none does. A torch without ``aot_compile``, or a block it cannot compile whole, falls back
to plain ``torch.compile`` (what every actor ran before), with a warning.

Measured on an H200 (2026-12-04, commit ``bf83842``, ``benchmarks/bench_warm_start.py``, RESULTS.md
"Twelfth session"): a warm first batch 1.24 s (plus 0.8-1.3 s to load the blocks) against 7.2-7.6 s
with ``torch.compile`` per block in the same call; cold 14.8 against 14.3 s.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
import weakref

import torch

log = logging.getLogger(__name__)

FORMAT = "vdr-precompiled-v1"


def _wrapper_chain(fn) -> list:
    """``fn`` and the functions its decorators wrap (transformers decorates ``forward``):
    pickled by name they would not be found again, so they travel as external data."""
    chain = []
    while fn is not None and fn not in chain:
        chain.append(fn)
        fn = getattr(fn, "__wrapped__", None)
    return chain


_REGISTRY: "weakref.WeakValueDictionary[str, PrecompiledForward]" = weakref.WeakValueDictionary()


def _registered(name: str) -> PrecompiledForward | None:
    return _REGISTRY.get(name)


class PrecompiledForward:
    """One block type's compiled forward, called as ``pf(module, *args, **kwargs)``."""

    def __reduce__(self):
        # Each block's ``forward`` attribute leads here, and torch pickles the module's state
        # with its guards: it travels by name (its compiled variants and lock cannot be pickled).
        return _registered, (self.name,)

    # More variants than this and the shapes are not what the guards generalise over (each new
    # one would cost a compilation of seconds): fall back to torch.compile, which has its own limit.
    MAX_VARIANTS = 8

    def __init__(self, name: str, forward, backend: str = "inductor", dynamic: bool = True,
                 external: dict | None = None):
        self.name = name
        self.forward = forward  # the class's forward (unbound): the module is an argument
        self.backend = backend
        self.dynamic = dynamic
        self.variants: list = []  # torch._dynamo.aot_compile.AOTCompiledFunction
        self.loaded = 0  # variants deserialized (a warm start)
        self.compiled = 0  # variants compiled in this process
        self.compile_s = 0.0
        self.fallback = None  # plain torch.compile, when aot_compile is missing or failed
        self.fallback_reason: str | None = None
        # While this returns True, a call that no variant accepts runs the block eagerly instead
        # of compiling it here: another process is compiling it (pipeline.embed.compile_helper)
        self.defer = None
        self.eager_calls = 0
        chain = _wrapper_chain(forward)
        self.external = {f"{name}.forward{i}": f for i, f in enumerate(chain)} | dict(external or {})
        self._globals = chain[-1].__globals__
        self._lock = threading.Lock()
        _REGISTRY[name] = self

    def __call__(self, module, *args, **kwargs):
        if self.fallback is None:
            for v in self.variants:
                if v.guard_check(module, *args, **kwargs):
                    return v.fn(module, *args, **kwargs)
            defer = self.defer
            if defer is not None and defer():
                self.eager_calls += 1
                return self.forward(module, *args, **kwargs)
            with self._lock:
                v = self._compile(module, args, kwargs)
            if v is not None:
                return v.fn(module, *args, **kwargs)
        return self.fallback(module, *args, **kwargs)

    def _compile(self, module, args, kwargs):
        for v in self.variants:  # another thread may have compiled it meanwhile
            if v.guard_check(module, *args, **kwargs):
                return v
        if self.fallback is not None:
            return None
        if len(self.variants) >= self.MAX_VARIANTS:
            self._fall_back(f"{len(self.variants)} variants compiled and the inputs fit none of them")
            return None
        t = time.perf_counter()
        try:
            with _aot_enabled():
                compiled = torch.compile(self.forward, fullgraph=True, dynamic=self.dynamic, backend=self.backend)
            # specialize_float: a float attribute (a scale) made the text layer's capture restart its
            # analysis, which aot_compile does not handle (torch 2.13, TensorifyScalarRestartAnalysis)
            with torch._dynamo.config.patch(specialize_float=True):
                v = compiled.aot_compile(((module, *args), kwargs))
        except Exception as exc:  # noqa: BLE001 - any failure: compile as every actor did before
            self._fall_back(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            return None
        self.compile_s += time.perf_counter() - t
        self.variants.append(v)
        self.compiled += 1
        return v

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        self.fallback = torch.compile(self.forward, dynamic=self.dynamic, backend=self.backend)
        log.warning("%s: ahead-of-time compilation not available (%s); compiling with torch.compile, "
                    "which traces again in every new process", self.name, reason)

    def serialize(self) -> list[bytes]:
        out = []
        for v in self.variants:
            out.append(type(v).serialize(v, self.external).serialized_data)
        return out

    def load(self, blobs: list[bytes]) -> int:
        """Add serialized variants (from :meth:`serialize` in another process); returns how many
        loaded. One that does not load is skipped (it is compiled again when needed)."""
        from torch._dynamo.aot_compile import AOTCompiledFunction

        n = 0
        for data in blobs:
            try:
                # under inference mode, as the forward runs: the guards it rebuilds expect the
                # dispatch keys of the tensors they were compiled for (inference tensors)
                with torch.inference_mode():
                    v = AOTCompiledFunction.deserialize(data, f_globals=self._globals,
                                                        external_closure_data=self.external)
                self.variants.append(v)
                n += 1
            except Exception as exc:  # noqa: BLE001 - a variant that cannot load is compiled again
                log.warning("%s: a precompiled variant could not be loaded (%s); it is compiled again if needed",
                            self.name, type(exc).__name__)
        self.loaded += n
        return n


def _aot_enabled():
    """torch.compile(...).aot_compile exists only with Dynamo's ``enable_aot_compile`` (off by
    default in torch 2.11, on in 2.13)."""
    import contextlib

    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        return torch._dynamo.config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


def install(blocks, name: str, backend: str = "inductor", external: dict | None = None) -> PrecompiledForward:
    """Route every module of ``blocks`` (one type) through one :class:`PrecompiledForward`."""
    import functools

    blocks = list(blocks)
    pf = PrecompiledForward(name, type(blocks[0]).forward, backend=backend, external=external)
    with _aot_enabled():
        available = hasattr(torch.compile(pf.forward), "aot_compile")
    if not available:
        pf._fall_back(f"torch {torch.__version__} has no aot_compile")
    for blk in blocks:
        blk.forward = functools.partial(pf, blk)
    return pf


def dumps(forwards: list[PrecompiledForward]) -> bytes:
    """All variants of ``forwards`` as one blob (empty list where none)."""
    return pickle.dumps({"format": FORMAT, "torch": torch.__version__,
                         "forwards": {pf.name: pf.serialize() for pf in forwards if pf.fallback is None}})


def _blob(data: bytes) -> dict:
    blob = pickle.loads(data)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("torch") != torch.__version__:
        raise ValueError("not a precompiled-blocks file of this torch")
    return blob


def names(data: bytes) -> set[str]:
    """The block types a :func:`dumps` blob holds variants of."""
    return {name for name, variants in _blob(data)["forwards"].items() if variants}


def merge(blobs: list[bytes]) -> bytes:
    """One :func:`dumps` blob of several (each block type's variants from all of them)."""
    merged: dict[str, list[bytes]] = {}
    for data in blobs:
        for name, variants in _blob(data)["forwards"].items():
            merged.setdefault(name, []).extend(variants)
    return pickle.dumps({"format": FORMAT, "torch": torch.__version__, "forwards": merged})


def loads(data: bytes, forwards: list[PrecompiledForward]) -> int:
    """Load a :func:`dumps` blob into ``forwards`` (by name); returns the variants loaded."""
    blob = _blob(data)
    return sum(pf.load(blob["forwards"].get(pf.name, [])) for pf in forwards if pf.fallback is None)
