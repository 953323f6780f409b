"""Submit the offline evaluation to a Ray cluster once per period.

    python -m jobs.schedule_eval --address http://HEAD:8265 --config jobs/configs/eval.yaml \\
        --period daily [--working-dir .] [--wait]

The Ray job's submission id is derived from the period (``offline-eval-daily-2026-11-22``)
and is also the evaluation's run id. The Ray Jobs server refuses a submission id it has
seen before (atomically, in the GCS), so a second trigger in the same period - a cron retry,
two schedulers, a manual rerun - submits nothing and exits 0 with "already submitted for
this period". Run it from cron or a Kubernetes CronJob; see the README.

Exit status: 0 submitted (or already submitted); with ``--wait``, the job's own outcome
(0 succeeded, 3 failed - a regression or an error, see ``ray job logs ID``); 1 on errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from datetime import datetime, timezone

logger = logging.getLogger(__name__)

PERIODS = ("hourly", "daily", "weekly", "monthly")
ALREADY_SUBMITTED = "already submitted for this period"


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


def build_entrypoint(config: str, run_id: str, python: str = "python", extra_args: list[str] | None = None) -> str:
    args = [python, "-m", "jobs.offline_eval", "--config", config, "--run-id", run_id, *(extra_args or [])]
    return shlex.join(args)


def submit_once(
    client,
    sub_id: str,
    entrypoint: str,
    runtime_env: dict | None = None,
    metadata: dict | None = None,
    entrypoint_num_cpus: float | None = None,
    retry_s: float = 120.0,
) -> tuple[bool, str]:
    """(submitted, message). ``submitted`` is False when the id was already used.

    The check is the server's own: ``submit_job`` with a used ``submission_id`` raises
    (``RuntimeError: ... Job with submission_id X already exists``), so two triggers racing
    each other still start one job. The message carries the existing job's status.
    A cluster that is still starting ("No available agent to submit job") is retried for
    up to ``retry_s``; the submission id keeps a retry from running twice."""
    deadline = time.monotonic() + retry_s
    delay = 1.0
    while True:
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=sub_id,
                runtime_env=runtime_env or None,
                metadata=metadata or None,
                entrypoint_num_cpus=entrypoint_num_cpus,
            )
            return True, f"{sub_id}: submitted"
        except RuntimeError as exc:
            if "already exists" in str(exc):
                break
            if "No available agent" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            logger.info("the Ray cluster has no job agent yet; retrying in %.0f s", delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
    try:
        status = client.get_job_status(sub_id)
    except Exception:  # the status is a courtesy; the refusal is what matters
        status = "unknown"
    return False, f"{sub_id}: {ALREADY_SUBMITTED} (status {status})"


def wait_for(client, sub_id: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Poll until the job reaches a terminal status (or the timeout); returns the status."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(sub_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status)
        if time.monotonic() > deadline:
            return str(status)
        time.sleep(poll_s)


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


def make_client(address: str | None):
    """A JobSubmissionClient for the dashboard at ``address`` (default: RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    _use_ray_auth_token()
    return JobSubmissionClient(address)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.schedule_eval", description=__doc__.split("\n")[0])
    p.add_argument("--address", default=None, help="Ray dashboard URL, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--config", required=True, help="eval YAML, as seen by the job (relative to its working dir)")
    p.add_argument("--period", choices=PERIODS, default="daily")
    p.add_argument("--name", default="offline-eval", help="submission id prefix (default: %(default)s)")
    p.add_argument("--now", help="ISO time that picks the period (default: now, UTC); for backfills")
    p.add_argument("--working-dir", help="local folder to upload as the job's working_dir (default: code in the image)")
    p.add_argument("--runtime-env-json", help="extra runtime_env as JSON (env_vars, pip, ...)")
    p.add_argument("--python", default="python", help="interpreter on the cluster (default: %(default)s)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None)
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its outcome")
    p.add_argument("--timeout-s", type=float, default=6 * 3600, help="with --wait: give up after this long")
    p.add_argument("job_args", nargs="*", help="after --: extra flags for jobs.offline_eval")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    now = datetime.fromisoformat(args.now) if args.now else datetime.now(timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    sub_id = submission_id(args.name, args.period, now)
    runtime_env = json.loads(args.runtime_env_json) if args.runtime_env_json else {}
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    entrypoint = build_entrypoint(args.config, run_id=sub_id, python=args.python, extra_args=args.job_args)
    client = make_client(args.address)
    submitted, message = submit_once(
        client,
        sub_id,
        entrypoint,
        runtime_env=runtime_env,
        metadata={"period": args.period, "period_key": period_key(args.period, now), "job": "offline_eval"},
        entrypoint_num_cpus=args.entrypoint_num_cpus,
    )
    print(message)
    if not args.wait:
        return 0
    status = wait_for(client, sub_id, args.timeout_s)
    print(f"{sub_id}: {status}")
    return 0 if status == "SUCCEEDED" else 3


if __name__ == "__main__":
    sys.exit(main())
