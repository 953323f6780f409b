"""Inductor heuristics changed for this model's shapes.

**Persistent norms** (on by default since 2026-12-05; ``VDR_PERSISTENT_NORMS=0`` turns them
off). Inductor writes a row reduction (a LayerNorm, an RMSNorm) as a *persistent* Triton kernel,
the whole row held in registers and read once, only up to 1,024 values per row
(``InductorChoices.should_use_persistent_reduction``, torch 2.11-2.13); wider rows get a looped
kernel that reads the row again to normalize it. The vision blocks' LayerNorms are 1,280 wide and
the text layers' RMSNorms 1,536: all looped. This raises the limit to 2,048 for inner
reductions, through Inductor's own extension point (``config.inductor_choices_class``, an
``InductorChoices`` subclass, which every thread's ``V.choices`` is made from), so those norms
compile persistent. Measured on an H200 (2026-12-05, RESULTS fourteenth session, the actor at two
batches in flight, 3 profiled batches of 32 letter pages): the two vision LayerNorm kernels from
98 to 43 ms (``triton_red_...`` to ``triton_per_...``), the actor from 62.4 to 64.1 pages/s
(+2.8%), its vectors as close to the eager actor's as the default compiled ones (cosine min
0.99883 vs 0.99887). The compile cache keys it apart (:func:`tag`). On CPU Inductor writes C++
and this choice does not apply.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

PERSISTENT_NORMS_ENV = "VDR_PERSISTENT_NORMS"
PERSISTENT_LIMIT = 2048
_installed: list = []  # [True, the settings it makes, the values they replaced] once installed


def persistent_norms_requested() -> bool:
    """On unless ``VDR_PERSISTENT_NORMS`` is 0/false/off/no (the default since 2026-12-05:
    measured +2.8% on the actor, H200; module docstring). Another value is refused."""
    from pipeline.config import env_flag

    return env_flag(PERSISTENT_NORMS_ENV, True)


def tag() -> str | None:
    """What the compile cache key must include: None when Inductor's defaults hold."""
    return f"persistent-inner-reductions<={PERSISTENT_LIMIT}" if _installed else None


def _choices_class(limit: int):
    """The ``InductorChoices`` subclass, made on first use (importing Inductor is slow) and kept
    as this module's ``WiderPersistentNorms`` so that pickle (Inductor's cache keys in torch
    versions that pickle their config) finds it by name."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    base = InductorChoices.should_use_persistent_reduction

    class WiderPersistentNorms(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(*args, **kwargs) -> bool:
            use = base(*args, **kwargs)
            features = args[0] if args else kwargs.get("features")
            cooperative = args[1] if len(args) > 1 else kwargs.get("cooperative_reduction", False)
            if use or cooperative or not config.triton.persistent_reductions or features is None:
                return use
            try:
                if features.get_reduction_hint() != ReductionHint.INNER:
                    return use
                return bool(V.graph.sizevars.statically_known_leq(features.reduction_numel, limit))
            except Exception:  # a torch whose features differ: keep Inductor's own choice
                return use

        def uuid(self) -> str:  # what Inductor's cache keys record of the choices (torch >= 2.13)
            return f"vdr-persistent-inner-reductions<={limit}"

    # a module-level name that says the limit: torch < 2.13 keys its FX graph cache on the class,
    # pickled by reference (module and name)
    name = f"WiderPersistentNorms{limit}"
    WiderPersistentNorms.__module__, WiderPersistentNorms.__name__ = __name__, name
    WiderPersistentNorms.__qualname__ = name
    globals()[name] = WiderPersistentNorms
    return WiderPersistentNorms


def _keyed_by_inductor(config) -> bool:
    """Whether Inductor's FX graph cache keys on ``config.inductor_choices_class``: torch >= 2.13
    through the factory's ``uuid()`` (``_cache_config_factory_keys``); torch 2.11 keeps it in
    ``save_config_portable()``, which its cache key pickles (a class by module and name; a value
    that does not pickle bypasses the cache)."""
    if "inductor_choices_class" in getattr(config, "_cache_config_factory_keys", ()):
        return True
    try:
        return "inductor_choices_class" in config.save_config_portable()
    except Exception:  # noqa: BLE001 - another torch: do not rely on it
        return False


def install_persistent_norms(limit: int = PERSISTENT_LIMIT) -> bool:
    """Make Inductor write inner reductions of up to ``limit`` values per row as persistent
    kernels (its own limit is 1,024). Process-wide; once. False when this torch lacks the hook.

    Installed as ``config.inductor_choices_class`` (the factory each thread's ``V.choices`` is
    made from) and as this thread's handler. Torch 2.13 keeps config overrides per thread
    (ContextVars), and the actor compiles its blocks in the threads that call it, not in the
    one that loaded the model: :func:`apply_in_this_thread` (called before every forward)
    sets both in the calling thread. Inductor's own caches must tell the kernels apart from the
    default ones: torch >= 2.13 keys its FX graph cache on the factory's ``uuid()``, torch 2.11
    on the class's name (:func:`_keyed_by_inductor`); where this torch does neither, the FX graph
    and AOTAutograd caches are turned off while installed."""
    if _installed:
        apply_in_this_thread()
        return True
    try:
        from torch._inductor import config

        cls = _choices_class(limit)
    except ImportError as exc:  # pragma: no cover - another torch
        log.warning("%s ignored: this torch has no Inductor choices hook (%s)", PERSISTENT_NORMS_ENV, exc)
        return False
    if not hasattr(config, "inductor_choices_class"):  # pragma: no cover - an older torch
        log.warning("%s ignored: this torch has no config.inductor_choices_class", PERSISTENT_NORMS_ENV)
        return False
    settings = {"inductor_choices_class": cls}
    if not _keyed_by_inductor(config):
        settings["fx_graph_cache"] = False
        settings["enable_autograd_cache"] = False
        log.info("%s: this torch does not key its FX graph cache on the choices; that cache is off",
                 PERSISTENT_NORMS_ENV)
    configs = _configs()
    with _lock:
        if not _installed:
            # what uninstalling restores, in every thread: the values before the install, read in
            # this thread (a torch that keeps config per thread starts each thread at them too)
            defaults = {k: getattr(configs[k], k) for k in settings if hasattr(configs[k], k)}
            _installed.extend([True, settings, defaults])
            _generation[0] += 1
    apply_in_this_thread()
    log.info("Inductor: inner reductions of up to %d values per row compile as persistent kernels (%s)",
             limit, PERSISTENT_NORMS_ENV)
    return True


_lock = threading.Lock()  # guards _installed, _generation and _last_defaults
_generation = [0]  # bumped by every install and uninstall
_last_defaults: dict = {}  # the values the last uninstall restored
_thread = threading.local()  # .generation: the one this thread's settings follow


def _configs():
    import torch._functorch.config as fconfig
    from torch._inductor import config

    return {"inductor_choices_class": config, "fx_graph_cache": config, "enable_autograd_cache": fconfig}


def apply_in_this_thread() -> None:
    """Bring the calling thread's Inductor settings in line with the process's: the wider
    choices and cache settings while installed; the values from before the install again in a
    thread that had them, once uninstalled. A dict lookup when nothing changed since this
    thread's last call."""
    generation = _generation[0]
    if getattr(_thread, "generation", 0) == generation:
        return
    with _lock:  # one consistent view: the generation and what it stands for
        generation = _generation[0]
        settings = _installed[1] if _installed else None
        defaults = _last_defaults.copy()
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    configs = _configs()
    if settings is not None:
        for k, v in settings.items():
            if hasattr(configs[k], k):
                setattr(configs[k], k, v)
        _thread.applied = True
        V.set_choices_handler(settings["inductor_choices_class"]())
    elif getattr(_thread, "applied", False):
        for k, v in defaults.items():
            setattr(configs[k], k, v)
        factory = defaults.get("inductor_choices_class")
        V.set_choices_handler(factory() if factory is not None else InductorChoices())
        _thread.applied = False
    _thread.generation = generation


def uninstall() -> None:
    """Inductor's own heuristics and cache settings again (benchmarks that compare both in one
    process): at once in this thread, and in any other at its next :func:`apply_in_this_thread`."""
    with _lock:
        if not _installed:
            return
        _last_defaults.clear()
        _last_defaults.update(_installed[2])
        _installed.clear()
        _generation[0] += 1
    apply_in_this_thread()
