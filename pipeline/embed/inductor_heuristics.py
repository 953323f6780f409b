"""Inductor heuristics changed for this model's shapes: opt-in experiments, off by default.

**Persistent norms** (``VDR_PERSISTENT_NORMS=1``). Inductor writes a row reduction (a
LayerNorm, an RMSNorm) as a *persistent* Triton kernel, the whole row held in registers and
read once, only up to 1,024 values per row (``InductorChoices.should_use_persistent_reduction``,
torch 2.11-2.13); wider rows get a looped kernel that reads the row again to normalize it. The
vision blocks' LayerNorms are 1,280 wide and the text layers' RMSNorms 1,536: all looped. On an
H200 (ninth session's profile, 3 batches of 32 letter pages) the two vision LayerNorm kernels
(``triton_red_fused_native_layer_norm``, ``triton_red_fused_add_native_layer_norm``) took 95 ms
of 1,463 ms of kernels, ~0.5 ms per call for ~0.5-0.75 GB moved: 1-1.5 TB/s of the chip's 4.8.
This raises the limit to 2,048 for inner reductions, through Inductor's own extension point
(``V.set_choices_handler`` with an ``InductorChoices`` subclass), so those norms compile
persistent. Prediction (not measured): about half of those 95 ms saved, the actor ~2-3% faster;
the sums are the same per row in float32 (another order), within bf16 rounding. The compile
cache keys it apart (:func:`tag`). On CPU Inductor writes C++ and this choice does not apply.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

PERSISTENT_NORMS_ENV = "VDR_PERSISTENT_NORMS"
PERSISTENT_LIMIT = 2048
_installed: list = []  # [True, the default choices class] once installed


def persistent_norms_requested() -> bool:
    return os.environ.get(PERSISTENT_NORMS_ENV, "0") == "1"


def tag() -> str | None:
    """What the compile cache key must include: None when Inductor's defaults hold."""
    return f"persistent-inner-reductions<={PERSISTENT_LIMIT}" if _installed else None


def install_persistent_norms(limit: int = PERSISTENT_LIMIT) -> bool:
    """Make Inductor write inner reductions of up to ``limit`` values per row as persistent
    kernels (its own limit is 1,024). Process-wide; once. False when this torch lacks the hook."""
    if _installed:
        return True
    try:
        from torch._inductor import config
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V
    except ImportError as exc:  # pragma: no cover - another torch
        log.warning("%s=1 ignored: this torch has no Inductor choices hook (%s)", PERSISTENT_NORMS_ENV, exc)
        return False
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

    V.set_choices_handler(WiderPersistentNorms())
    _installed.append(True)
    _installed.append(InductorChoices)
    log.info("Inductor: inner reductions of up to %d values per row compile as persistent kernels (%s=1)",
             limit, PERSISTENT_NORMS_ENV)
    return True


def uninstall() -> None:
    """Inductor's own heuristics again (benchmarks that compare both in one process)."""
    if _installed:
        from torch._inductor.virtualized import V

        V.set_choices_handler(_installed[1]())
        _installed.clear()
