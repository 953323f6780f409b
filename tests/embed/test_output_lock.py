"""The output folder's lock (``OUT/_lock.json``) and the cleaning of crash leftovers, with
real local folders, a real S3 endpoint (moto's server on 127.0.0.1), a real Ray and the tiny
ColQwen2: a second run on a held output is refused before it writes anything, an expired
lock is taken over, the lock is gone after a run, and what a crashed run left is removed
and counted in summary.json."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jobs import embed_corpus
from pipeline import storage

TOKENS = "64"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def argv(inp, out, model, *extra):
    return ["--input", inp, "--output", out, "--model", model, "--max-visual-tokens", TOKENS,
            "--batch-size", "4", *extra]


def lock_body(expires_in_s: float) -> bytes:
    now = time.time()
    return json.dumps({"run_id": "run-held-elsewhere", "host": "gpu-node-7", "pid": 4242,
                       "started_at": "2026-01-02T03:04:05Z", "renewed_at": "2026-01-02T03:05:05Z",
                       "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + expires_in_s)),
                       "expires_at_unix": now + expires_in_s}).encode()


def tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def assert_refusal(msg, lock_uri):
    assert lock_uri in msg and "gpu-node-7" in msg and "4242" in msg and "run-held-elsewhere" in msg
    assert "delete" in msg


def test_held_lock_refuses_at_once_and_writes_nothing_local(ray_session, tiny_model, sample_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_lock.json").write_bytes(lock_body(600))
    before = (out / "_lock.json").read_bytes()
    t0 = time.monotonic()
    assert embed_corpus.main(argv(sample_corpus, str(out), tiny_model)) == 2
    assert time.monotonic() - t0 < 30
    assert_refusal(capsys.readouterr().err, str(out / "_lock.json"))
    assert tree(out) == ["_lock.json"]  # no config.json, no pages, the holder's lock untouched
    assert (out / "_lock.json").read_bytes() == before


def test_held_lock_refuses_at_once_and_writes_nothing_s3(ray_session, tiny_model, sample_corpus, s3, capsys):
    bucket = s3.make_bucket()
    s3.upload_folder(sample_corpus, bucket, "docs/")
    s3.client().put_object(Bucket=bucket, Key="emb/_lock.json", Body=lock_body(600))
    t0 = time.monotonic()
    assert embed_corpus.main(argv(f"s3://{bucket}/docs/", f"s3://{bucket}/emb", tiny_model,
                                  "--endpoint-url", s3.endpoint_url)) == 2
    assert time.monotonic() - t0 < 30
    assert_refusal(capsys.readouterr().err, f"s3://{bucket}/emb/_lock.json")
    assert s3.keys(bucket, "emb/") == ["emb/_lock.json"]
    assert json.loads(s3.client().get_object(Bucket=bucket, Key="emb/_lock.json")["Body"].read())["pid"] == 4242


def test_command_line_exits_non_zero_with_the_holder(ray_cluster, tiny_model, sample_corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_lock.json").write_bytes(lock_body(600))
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "jobs.embed_corpus", *argv(sample_corpus, str(out), tiny_model),
                           "--ray-address", ray_cluster["gcs_address"]],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert str(out / "_lock.json") in proc.stderr and "gpu-node-7" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree(out) == ["_lock.json"]


def test_expired_lock_is_taken_over_and_released_local(ray_session, tiny_model, sample_corpus, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_lock.json").write_bytes(lock_body(-60))
    assert embed_corpus.main(argv(sample_corpus, str(out), tiny_model)) == 0
    assert "taking over the lock" in caplog.text and "run-held-elsewhere" in caplog.text
    assert "its lease expired at" in caplog.text
    assert not (out / "_lock.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["pages"] == 8
    assert summary["cleaned"] == {"temporary_files": 0, "multipart_uploads": 0}
    # a lock file in the output is invisible to the readers of the output (scoring included)
    from pipeline.score.corpus import open_corpus

    (out / "_lock.json").write_bytes(lock_body(600))
    n_files = len([f for f in os.listdir(out / "pages") if f.endswith(".parquet")])
    corpus = open_corpus(str(out))
    assert len(corpus.files) == n_files
    assert all(os.path.basename(f.path).startswith("part-") for f in corpus.files)
    _, infos = storage.list_files(str(out), suffix=".json")
    assert [i.base_name for i in infos] == ["config.json", "summary.json"]


def test_lock_is_released_when_the_run_fails(ray_session, tiny_model, tmp_path):
    out = tmp_path / "out"
    rc = embed_corpus.main(argv(str(tmp_path / "nowhere"), str(out), tiny_model))
    assert rc == 2
    assert not (out / "_lock.json").exists()


def test_temporary_files_of_a_crashed_run_are_removed(ray_session, tiny_model, sample_corpus, tmp_path):
    out = tmp_path / "out"
    for sub in ("pages", "errors"):
        (out / sub).mkdir(parents=True)
    (out / "pages" / ".tmp-999-x.parquet").write_bytes(b"PAR1 half written")
    (out / "errors" / ".tmp-999-y.parquet").write_bytes(b"PAR1 half")
    (out / ".tmp-999-summary.json").write_bytes(b"{")
    (out / "pages" / ".keep-me").write_bytes(b"not ours")
    assert embed_corpus.main(argv(sample_corpus, str(out), tiny_model)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cleaned"] == {"temporary_files": 3, "multipart_uploads": 0}
    assert not [f for f in tree(out) if os.path.basename(f).startswith(".tmp-")]
    assert (out / "pages" / ".keep-me").exists()
    assert not (out / "_lock.json").exists()


def test_s3_unfinished_uploads_aborted_expired_lock_taken_over(ray_session, tiny_model, sample_corpus, s3):
    bucket = s3.make_bucket()
    s3.upload_folder(sample_corpus, bucket, "docs/")
    c = s3.client()
    c.put_object(Bucket=bucket, Key="emb/_lock.json", Body=lock_body(-60))
    mine = c.create_multipart_upload(Bucket=bucket, Key="emb/pages/part-crashed.parquet")
    c.upload_part(Bucket=bucket, Key="emb/pages/part-crashed.parquet", UploadId=mine["UploadId"], PartNumber=1,
                  Body=b"x" * (5 * 1024 * 1024))
    c.create_multipart_upload(Bucket=bucket, Key="emb-other/pages/part-z.parquet")  # another prefix: kept
    assert embed_corpus.main(argv(f"s3://{bucket}/docs/", f"s3://{bucket}/emb", tiny_model,
                                  "--endpoint-url", s3.endpoint_url)) == 0
    summary = json.loads(c.get_object(Bucket=bucket, Key="emb/summary.json")["Body"].read())
    assert summary["cleaned"] == {"temporary_files": 0, "multipart_uploads": 1}
    assert summary["this_run"]["pages"] == 8
    left = [u["Key"] for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == ["emb-other/pages/part-z.parquet"]
    keys = s3.keys(bucket, "emb/")
    assert "emb/_lock.json" not in keys and "emb/summary.json" in keys


def test_two_locks_on_one_output_exclude_each_other(tmp_path, s3):
    """The primitive itself: create-only on both backends, renewal keeps it ours, release
    removes only our own lock."""
    bucket = s3.make_bucket()
    for out in (str(tmp_path / "out"), f"s3://{bucket}/emb"):
        first = storage.acquire_output_lock(out, s3.endpoint_url, renew_s=0.2)
        try:
            time.sleep(0.6)  # a few renewals
            with pytest.raises(storage.OutputLockedError):
                storage.acquire_output_lock(out, s3.endpoint_url)
            held = storage.read_json(storage.join_uri(out, storage.LOCK_FILE), s3.endpoint_url)
            assert held["run_id"] == first.run_id and held["host"] == socket.gethostname()
            assert held["pid"] == os.getpid() and held["expires_at_unix"] > time.time() + storage.LOCK_TTL_S - 5
        finally:
            first.release()
        assert not storage.exists(storage.join_uri(out, storage.LOCK_FILE), s3.endpoint_url)


def test_a_lock_left_by_a_killed_run_on_this_host_is_taken_over_at_once(ray_session, tiny_model, sample_corpus,
                                                                          tmp_path, caplog):
    """kill -9 of a driver leaves its lock; a rerun on the same host sees the holder's pid is
    gone and goes ahead, without waiting for the lease to expire."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    body = json.loads(lock_body(600))
    body.update(host=socket.gethostname(), pid=dead.pid)
    (out / "_lock.json").write_text(json.dumps(body))
    assert embed_corpus.main(argv(sample_corpus, str(out), tiny_model)) == 0
    assert not (out / "_lock.json").exists()
    # said as it is: the holder is gone, its lease had not expired (the log said "expired at" a future time)
    assert "its process on this host is gone" in caplog.text and "expired at" not in caplog.text
