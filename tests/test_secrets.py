"""No credential, token or key appears in what the jobs write or log: both jobs run with known
fake secrets in the environment of the driver and of every Ray worker, on a real S3 endpoint
(moto) and an input that produces error rows too; then every output object, the summaries,
what the driver printed and logged, and every file under the session cluster's temp dir
(all Ray logs: driver, workers, actors, raylet, dashboard, runtime env agent) are searched
for each secret."""

from __future__ import annotations

import json
import logging
import os
import tempfile


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = "64"

# The s3 fixture (conftest.py) sets AWS_SECRET_ACCESS_KEY itself; these are added at import,
# that is before the session Ray cluster starts and copies this environment for its workers.
FAKE_SECRETS = {
    "AWS_SESSION_TOKEN": "FAKE-session-token-7f3a9c1e-not-for-logs",
    "HF_TOKEN": "hf_FAKEtoken4b8d2e6a0c-not-for-logs",
}
FAKE_SA_KEY_ID = "FAKE-private-key-id-91c2d7-not-for-logs"
FAKE_SA_KEY = "FAKE-private-key-body-5e0b3a-not-for-logs"
_sa = tempfile.NamedTemporaryFile("w", suffix=".json", prefix="fake-sa-", delete=False)
json.dump({"type": "service_account", "project_id": "fake-project", "private_key_id": FAKE_SA_KEY_ID,
           "private_key": f"-----BEGIN PRIVATE KEY-----\n{FAKE_SA_KEY}\n-----END PRIVATE KEY-----\n",
           "client_email": "fake@fake-project.iam.gserviceaccount.com", "client_id": "1",
           "token_uri": "http://127.0.0.1:9/token"}, _sa)
_sa.close()
os.environ.update(FAKE_SECRETS)
os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = _sa.name
S3_SECRET = "testing-secret-not-for-logs"  # tests/conftest.py, s3 fixture
SECRETS = [S3_SECRET, *FAKE_SECRETS.values(), FAKE_SA_KEY_ID, FAKE_SA_KEY]


def _files_under(folder: str):
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path


def test_no_secret_in_outputs_summaries_or_logs(ray_session, ray_cluster, s3, tiny_model, sample_corpus,
                                                tmp_path, capsys, caplog):
    from jobs import embed_corpus, score_queries

    caplog.set_level(logging.DEBUG)
    # The secrets are really there, in the driver and in the workers that read, render and embed.
    @ray_session.remote(num_cpus=0)
    def worker_env():
        return {k: os.environ.get(k) for k in [*FAKE_SECRETS, "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS"]}

    seen = ray_session.get(worker_env.remote())
    assert seen == {**FAKE_SECRETS, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "GOOGLE_APPLICATION_CREDENTIALS": _sa.name}

    bucket = s3.make_bucket()
    s3.upload_folder(sample_corpus, bucket, "docs/")  # two of its documents end as error rows
    s3.client().upload_file(os.path.join(ROOT, "tests", "data", "bad1.pdf"), bucket, "docs/broken/bad1.pdf")
    capsys.readouterr()
    caplog.clear()  # from here on, only what the jobs print and log
    # -v: the driver logs at DEBUG, where HTTP clients log request headers
    assert embed_corpus.main(["--input", f"s3://{bucket}/docs/", "--output", f"s3://{bucket}/emb", "--model",
                              tiny_model, "--max-visual-tokens", TOKENS, "--batch-size", "4", "-v"]) == 0
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query_id": "q1", "text": "annual report"}\n{"query_id": "q2", "text": "fax"}\n')
    assert score_queries.main(["--corpus", f"s3://{bucket}/emb", "--queries", str(queries), "--output",
                               f"s3://{bucket}/scores", "--top-k", "3", "--model", tiny_model]) == 0

    keys = s3.keys(bucket)
    errors = [k for k in keys if k.startswith("emb/errors/")]
    assert errors and "emb/summary.json" in keys and "scores/summary.json" in keys and "scores/results.parquet" in keys
    searched: dict[str, bytes] = {f"s3://{bucket}/{k}": s3.client().get_object(Bucket=bucket, Key=k)["Body"].read()
                                  for k in keys}
    printed = capsys.readouterr()
    searched["driver stdout"] = printed.out.encode()
    searched["driver stderr"] = printed.err.encode()
    searched["driver log records"] = caplog.text.encode()
    n_ray_files = 0
    for path in _files_under(ray_cluster["temp_dir"]):
        if "/runtime_resources/" in path:
            continue  # the project's own code that `ray job submit` uploaded (these tests hold the fake secrets)
        try:
            with open(path, "rb") as f:
                searched[path] = f.read()
            n_ray_files += 1
        except OSError:  # a socket or a file removed meanwhile
            pass
    assert n_ray_files > 10 and any("worker" in p for p in searched)  # the worker logs were read
    error_rows = b"".join(v for k, v in searched.items() if "/emb/errors/" in k)
    assert b"CorruptDocument" in error_rows  # error messages were written, and searched
    leaks = [(secret, where) for where, data in searched.items() for secret in SECRETS if secret.encode() in data]
    assert not leaks, f"secrets found in outputs or logs: {leaks}"
