"""Scheduling through the Ray Jobs API: one run per period, even when triggered twice."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.devtools.judged import results_table, write_corpus, write_queries, write_trec_qrels
from jobs import schedule_eval
from pipeline.cluster import job_client
from pipeline.evaluate import schedule
from pipeline.evaluate import history

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_period_keys_and_submission_ids():
    t = datetime(2026, 11, 22, 23, 59, tzinfo=timezone.utc)
    assert schedule.submission_id("offline-eval", "daily", t) == "offline-eval-daily-2026-11-22"
    assert schedule.period_key("weekly", datetime(2027, 1, 1, tzinfo=timezone.utc)) == "2026-W53"  # ISO week
    assert schedule.period_key("hourly", t) == "2026-11-22T23"
    assert schedule.period_key("monthly", t) == "2026-11"
    # the same period from another time zone is the same UTC day
    from datetime import timedelta

    other = datetime(2026, 11, 23, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert schedule.period_key("daily", other) == "2026-11-22"
    with pytest.raises(ValueError, match="period"):
        schedule.period_key("fortnightly", t)
    entry = schedule.build_entrypoint("cfg dir/eval.yaml", "offline-eval-daily-2026-11-22")
    assert entry == "python -m jobs.offline_eval --config 'cfg dir/eval.yaml' --run-id offline-eval-daily-2026-11-22"
    # a backfill (--now) passes the time its run stands for (it was recorded at when it ran)
    entry = schedule.build_entrypoint("eval.yaml", "offline-eval-weekly-2026-W45", run_time="2026-11-03T00:00:00+00:00")
    assert "--run-time 2026-11-03T00:00:00+00:00" in entry


@pytest.fixture()
def eval_config(tmp_path):
    """An offline-eval config over an existing run (no scoring), so the Ray job is quick."""
    vectors = write_corpus(tmp_path / "corpus", n_docs=2)
    pages = sorted(vectors)
    qrels = write_trec_qrels(tmp_path / "qrels.txt", [("q1", pages[0], 1), ("q2", pages[1], 1)])
    run = tmp_path / "results.parquet"
    pq.write_table(results_table([("q1", pages[0], 1, 2.0), ("q2", pages[2], 1, 2.0), ("q2", pages[1], 2, 1.0)]), run)
    config = tmp_path / "eval.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "corpus": str(tmp_path / "corpus"),
                "queries": write_queries(tmp_path / "queries.jsonl", ["q1", "q2"]),
                "qrels": qrels,
                "run": str(run),
                "output_root": str(tmp_path / "runs"),
                "top_k": 10,
            }
        )
    )
    return config


def _trigger(ray_cluster, config, now, *extra):
    return schedule_eval.main(
        [
            "--address", ray_cluster["dashboard_url"],
            "--config", str(config),
            "--period", "daily",
            "--now", now,
            "--python", sys.executable,
            "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": REPO}}),
            "--timeout-s", "240",
            *extra,
        ]
    )


def test_double_trigger_runs_once_per_period(ray_cluster, eval_config, tmp_path, capsys):
    client = job_client(ray_cluster["dashboard_url"])
    # a unique prefix per test run: the cluster remembers submission ids for its lifetime
    name = f"offline-eval-test-{os.getpid()}-{tmp_path.name}"
    sub_id = f"{name}-daily-2026-11-22"

    assert _trigger(ray_cluster, eval_config, "2026-11-22T06:00:00+00:00", "--name", name) == 0
    assert capsys.readouterr().out.strip() == f"{sub_id}: submitted"
    # second trigger in the same period, while the first may still run: nothing submitted
    assert _trigger(ray_cluster, eval_config, "2026-11-22T18:30:00+00:00", "--name", name, "--wait") == 0
    out = capsys.readouterr().out
    assert f"{sub_id}: {schedule.ALREADY_SUBMITTED}" in out
    assert f"{sub_id}: SUCCEEDED" in out, client.get_job_logs(sub_id)

    ours = [j for j in client.list_jobs() if (j.submission_id or "").startswith(name)]
    assert [j.submission_id for j in ours] == [sub_id]
    runs = history.read_history(str(tmp_path / "runs" / "history"))
    assert list(runs.run_id) == [sub_id]  # the period's id is also the run id
    assert runs.iloc[0]["RR@10"] == pytest.approx(0.75)
    summary = json.loads((tmp_path / "runs" / sub_id / "summary.json").read_text())
    assert summary["run_id"] == sub_id and summary["exit_status"] == 0

    # a third trigger after the job finished still does not run it again
    assert _trigger(ray_cluster, eval_config, "2026-11-22T23:59:59+00:00", "--name", name) == 0
    assert f"{schedule.ALREADY_SUBMITTED} (status SUCCEEDED)" in capsys.readouterr().out
    # the next period is a new run
    assert _trigger(ray_cluster, eval_config, "2026-11-23T00:00:01+00:00", "--name", name, "--wait") == 0
    assert f"{name}-daily-2026-11-23: SUCCEEDED" in capsys.readouterr().out
    assert list(history.read_history(str(tmp_path / "runs" / "history")).run_id) == [sub_id, f"{name}-daily-2026-11-23"]


def test_racing_triggers_submit_one_job(ray_cluster, tmp_path):
    """Two schedulers firing at the same moment: the Jobs server accepts exactly one."""
    from concurrent.futures import ThreadPoolExecutor

    sub_id = f"race-{os.getpid()}-{tmp_path.name}-daily-2026-11-22"
    entrypoint = f"{sys.executable} -c 'pass'"

    def trigger(_):
        return schedule.submit_once(job_client(ray_cluster["dashboard_url"]), sub_id, entrypoint)

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(trigger, range(4)))
    assert sorted(submitted for submitted, _, _ in outcomes) == [False, False, False, True]
    assert all(ALREADY in message for submitted, message, _ in outcomes if not submitted)
    client = job_client(ray_cluster["dashboard_url"])
    assert schedule.wait_for(client, sub_id, timeout_s=120, poll_s=0.5) == "SUCCEEDED"
    assert [j.submission_id for j in client.list_jobs()].count(sub_id) == 1


ALREADY = schedule.ALREADY_SUBMITTED


def test_a_failed_period_is_tried_again_by_the_next_trigger(ray_cluster, tmp_path):
    """A period whose job FAILED does not stay blocked: the next trigger submits "<id>-r2"
    (atomically, like the first), and once that one runs or succeeded, triggers stop."""
    client = job_client(ray_cluster["dashboard_url"])
    sub_id = f"retry-{os.getpid()}-{tmp_path.name}-daily-2026-11-22"
    fail, ok = f"{sys.executable} -c 'import sys; sys.exit(1)'", f"{sys.executable} -c 'pass'"
    entrypoint = lambda run_id: ok if run_id.endswith("-r2") else fail  # noqa: E731

    submitted, message, used = schedule.submit_once(client, sub_id, entrypoint)
    assert (submitted, used) == (True, sub_id)
    assert schedule.wait_for(client, sub_id, timeout_s=120, poll_s=0.5) == "FAILED"
    submitted, message, used = schedule.submit_once(client, sub_id, entrypoint)
    assert (submitted, used) == (True, f"{sub_id}-r2") and "after failed" in message
    assert schedule.wait_for(client, used, timeout_s=120, poll_s=0.5) == "SUCCEEDED"
    submitted, message, used = schedule.submit_once(client, sub_id, entrypoint)
    assert not submitted and used == f"{sub_id}-r2" and f"{ALREADY} (status SUCCEEDED)" in message


def test_a_now_that_is_not_an_iso_time_is_a_usage_error(capsys):
    """--now yesterday: exit 2 with the format to use (it was an unexpected ValueError)."""
    with pytest.raises(SystemExit) as exc:
        schedule_eval.main(["--config", "eval.yaml", "--now", "yesterday"])
    assert exc.value.code == 2 and "is not an ISO time" in capsys.readouterr().err
