"""The Ray cluster as the jobs see it: connecting a driver (a given cluster, the one a job was
submitted to, or an embedded one) and the Jobs API client of the scheduler."""

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


def _use_ray_auth_token() -> None:
    """Send the Ray auth token when one exists, as ``ray start`` does.

    Clusters started where ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``)
    exists require it, but a plain JobSubmissionClient only sends it when RAY_AUTH_MODE=token.
    An explicit RAY_AUTH_MODE is respected."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def job_client(address: str | None):
    """A JobSubmissionClient for the dashboard at ``address`` (default: RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    _use_ray_auth_token()
    return JobSubmissionClient(address)


