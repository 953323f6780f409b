"""Scheduling the offline evaluation once per period, through the Ray Jobs API.

The Ray job's submission id is derived from the period (``offline-eval-daily-2026-11-22``)
and is also the evaluation's run id. The Ray Jobs server refuses a submission id it has
seen before (atomically, in the GCS), so a second trigger in the same period - a cron retry,
two schedulers, a manual rerun - submits nothing. The client comes from
:func:`pipeline.cluster.job_client`; these functions only call its methods.
"""

from __future__ import annotations

import logging
import shlex
import time
from datetime import datetime, timezone

logger = logging.getLogger(__name__)

PERIODS = ("hourly", "daily", "weekly", "monthly")
ALREADY_SUBMITTED = "already submitted for this period"
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")  # ray.job_submission.JobStatus values


def period_key(period: str, now: datetime) -> str:
    """The period that ``now`` (UTC) falls in.

    >>> t = datetime(2026, 11, 22, 13, 5, tzinfo=timezone.utc)
    >>> [period_key(p, t) for p in PERIODS]
    ['2026-11-22T13', '2026-11-22', '2026-W47', '2026-11']
    """
    now = now.astimezone(timezone.utc)
    if period == "hourly":
        return now.strftime("%Y-%m-%dT%H")
    if period == "daily":
        return now.strftime("%Y-%m-%d")
    if period == "weekly":
        year, week, _ = now.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "monthly":
        return now.strftime("%Y-%m")
    raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")


def submission_id(name: str, period: str, now: datetime) -> str:
    """``offline-eval-daily-2026-11-22``: the same for every trigger within one period."""
    return f"{name}-{period}-{period_key(period, now)}"


def iso_time(value: str) -> datetime:
    """An ISO time from a command line (``2026-11-03``, ``2026-11-03T01:30:00Z``), in UTC when it
    names no zone; argparse's ``type=`` for ``--now`` and ``--run-time``."""
    import argparse

    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO time (e.g. 2026-11-03 or "
                                         "2026-11-03T01:30:00Z)") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def build_entrypoint(config: str, run_id: str, python: str = "python", extra_args: list[str] | None = None,
                     run_time: str | None = None) -> str:
    """The Ray job's command. ``run_time`` (a backfill's ``--now``): the time the run stands for,
    so the history orders it among the others by its period, not by when it ran."""
    args = [python, "-m", "jobs.offline_eval", "--config", config, "--run-id", run_id,
            *(["--run-time", run_time] if run_time else []), *(extra_args or [])]
    return shlex.join(args)


FAILED_STATUSES = ("FAILED", "STOPPED")
# A period whose evaluation failed is tried again by the next trigger, under a new
# submission id (``...-r2``, ``...-r3``): Ray refuses a used id, and a failed run must not
# block its period for good. Bounded, so a broken config does not run on every tick forever.
MAX_ATTEMPTS = 5


def attempt_id(sub_id: str, attempt: int) -> str:
    """``offline-eval-daily-2026-11-22`` for the first attempt, then ``...-r2``, ``...-r3``.

    >>> [attempt_id("offline-eval-daily-2026-11-22", n) for n in (1, 2)]
    ['offline-eval-daily-2026-11-22', 'offline-eval-daily-2026-11-22-r2']
    """
    return sub_id if attempt == 1 else f"{sub_id}-r{attempt}"


def submit_once(
    client,
    sub_id: str,
    entrypoint,
    runtime_env: dict | None = None,
    metadata: dict | None = None,
    entrypoint_num_cpus: float | None = None,
    retry_s: float = 120.0,
    max_attempts: int = MAX_ATTEMPTS,
) -> tuple[bool, str, str]:
    """(submitted, message, submission id used). ``submitted`` is False when the period
    already has a job that is pending, running or succeeded.

    The check is the server's own: ``submit_job`` with a used ``submission_id`` raises
    (``RuntimeError: ... Job with submission_id X already exists``), so two triggers racing
    each other still start one job. When the period's job FAILED (or was STOPPED), the next
    trigger submits the next attempt id (:func:`attempt_id`), with the same atomicity.
    ``entrypoint`` is a string, or a function of the submission id (the run id).
    A cluster that is still starting ("No available agent to submit job") is retried for
    up to ``retry_s``; the submission id keeps a retry from running twice."""
    deadline = time.monotonic() + retry_s
    failed: list[str] = []
    for attempt in range(1, max_attempts + 1):
        this_id = attempt_id(sub_id, attempt)
        command = entrypoint(this_id) if callable(entrypoint) else entrypoint
        delay = 1.0
        while True:
            try:
                client.submit_job(
                    entrypoint=command,
                    submission_id=this_id,
                    runtime_env=runtime_env or None,
                    metadata=metadata or None,
                    entrypoint_num_cpus=entrypoint_num_cpus,
                )
                after = f" (after failed {', '.join(failed)})" if failed else ""
                return True, f"{this_id}: submitted{after}", this_id
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    break
                if "No available agent" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
                logger.info("the Ray cluster has no job agent yet; retrying in %.0f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)
        try:
            status = str(client.get_job_status(this_id))
        except Exception:  # the status is a courtesy; the refusal is what matters
            status = "unknown"
        if status not in FAILED_STATUSES:
            return False, f"{this_id}: {ALREADY_SUBMITTED} (status {status})", this_id
        failed.append(this_id)
    return False, (f"{sub_id}: {len(failed)} attempts failed this period ({', '.join(failed)}); not trying again "
                   "until the next period: see `ray job logs ID`"), failed[-1]


def wait_for(client, sub_id: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Poll until the job reaches a terminal status (or the timeout); returns the status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(sub_id)
        if str(status) in TERMINAL_STATUSES:
            return str(status)
        if time.monotonic() > deadline:
            return str(status)
        time.sleep(poll_s)


