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
import sys
from datetime import datetime, timezone

from pipeline.cluster import job_client
from pipeline.evaluate.schedule import (PERIODS, build_entrypoint, iso_time, period_key, submission_id, submit_once,
                                        wait_for)

logger = logging.getLogger(__name__)

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.schedule_eval", description=__doc__.split("\n")[0])
    p.add_argument("--address", default=None, help="Ray dashboard URL, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--config", required=True, help="eval YAML, as seen by the job (relative to its working dir)")
    p.add_argument("--period", choices=PERIODS, default="daily",
                   help="one submission per period; its id names the period (default: %(default)s)")
    p.add_argument("--name", default="offline-eval", help="submission id prefix (default: %(default)s)")
    p.add_argument("--now", type=iso_time, help="ISO time that picks the period (default: now, UTC); for backfills")
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
    now = args.now or datetime.now(timezone.utc)
    sub_id = submission_id(args.name, args.period, now)
    runtime_env = json.loads(args.runtime_env_json) if args.runtime_env_json else {}
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    client = job_client(args.address)
    submitted, message, sub_id = submit_once(
        client,
        sub_id,
        lambda run_id: build_entrypoint(args.config, run_id=run_id, python=args.python, extra_args=args.job_args,
                                        run_time=now.isoformat() if args.now else None),
        runtime_env=runtime_env,
        metadata={"period": args.period, "period_key": period_key(args.period, now), "job": "offline_eval"},
        entrypoint_num_cpus=args.entrypoint_num_cpus,
    )
    print(message)
    if not args.wait:
        return 0
    status = wait_for(client, sub_id, args.timeout_s)
    where = f" --address {args.address}" if args.address else ""
    print(f"{sub_id}: {status}" + ("" if status == "SUCCEEDED" else
                                   f" (its log: ray job logs {sub_id}{where}; its summary.json and history row "
                                   "name the error)"))
    return 0 if status == "SUCCEEDED" else 3


if __name__ == "__main__":
    from pipeline import cli

    sys.exit(cli.guarded(main, prog="schedule_eval"))
