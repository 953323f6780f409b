"""Connecting to Ray: a given cluster, the one this job was submitted to, or an embedded one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """``ray.init`` unless already connected. ``address`` (or ``RAY_ADDRESS``, which
    ``ray job submit`` sets) joins a cluster; with neither, Ray joins a cluster started on
    this machine by ``ray start`` or starts an embedded local one."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Our own modules must reach the workers: ship this checkout unless a job already did.
    runtime_env = init_kwargs.pop("runtime_env", None)
    if runtime_env is None and not os.environ.get("RAY_JOB_ID") and os.environ.get("RAY_JOB_SUBMISSION_ID") is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        runtime_env = {"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}}
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **init_kwargs)
    log.info("Ray resources: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})
