"""Repository-wide pytest settings (doctests of pipeline/ run too)."""

import importlib.util

# The fused GPU kernel imports Triton, which CPU-only installs do not have.
collect_ignore = [] if importlib.util.find_spec("triton") else ["pipeline/score/triton_kernel.py"]
