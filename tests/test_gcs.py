"""gs:// for real: every storage operation the jobs use, the embed job and the scoring job end
to end, against a real GCS JSON API endpoint on 127.0.0.1 (gcp-storage-emulator, reached
through STORAGE_EMULATOR_HOST as Google's own clients are); and a gs:// run that finds no
credentials or no endpoint ends in seconds with one message (no Google endpoint is ever
contacted: tests/conftest.py points the metadata server at a closed loopback port)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid

import pyarrow as pa
import pytest

from pipeline import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
TOKENS = "64"


class GcsEmulator:
    def __init__(self, endpoint: str, log_path: str):
        import gcsfs

        self.endpoint = endpoint
        self.log_path = log_path
        self.fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=endpoint, use_listings_cache=False,
                                      skip_instance_cache=True)

    def make_bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        return name

    def upload(self, local: str, uri: str) -> None:
        self.fs.put(local, uri.removeprefix("gs://"), recursive=os.path.isdir(local))

    def keys(self, prefix: str) -> list[str]:
        return sorted(self.fs.find(prefix.removeprefix("gs://")))

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """gcp-storage-emulator on the loopback port that STORAGE_EMULATOR_HOST names (set in
    conftest.py before the Ray cluster starts), with its request log kept."""
    shutil.which("gcp-storage-emulator") or os.path.exists(
        os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")) or pytest.skip("no gcp-storage-emulator")
    endpoint = os.environ["STORAGE_EMULATOR_HOST"]
    assert endpoint.startswith("http://127.0.0.1:"), endpoint
    port = endpoint.rsplit(":", 1)[1]
    log_path = str(tmp_path_factory.mktemp("gcs") / "emulator.log")
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start: {open(log_path).read()[-2000:]}")
            time.sleep(0.2)
    yield GcsEmulator(endpoint, log_path)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_storage_operations_on_gcs(gcs):
    """What the jobs do on object storage: list (hidden files skipped), read, whole-object
    writes, Parquet columns and footers, delete."""
    bucket = gcs.make_bucket()
    base = f"gs://{bucket}/in"
    storage.write_bytes_atomic(f"{base}/a.pdf", b"%PDF-1.4 a")
    storage.write_bytes_atomic(f"{base}/sub/b.png", b"png")
    storage.write_bytes_atomic(f"{base}/.hidden/c.pdf", b"x")
    storage.write_bytes_atomic(f"{base}/notes.txt", b"x")
    assert storage.read_bytes(f"{base}/a.pdf") == b"%PDF-1.4 a"
    assert storage.exists(f"{base}/a.pdf") and not storage.exists(f"{base}/missing.pdf")
    assert storage.listing_units(base) == ["", ".hidden", "sub"]
    skipped: dict = {}
    t = storage.list_documents_table(base, skipped=skipped)
    assert t.column("doc_id").to_pylist() == ["a.pdf", "sub/b.png"]
    assert t.column("source_uri").to_pylist() == [f"{base}/a.pdf", f"{base}/sub/b.png"]
    assert t.column("size_bytes").to_pylist() == [10, 3]
    assert skipped == {"hidden": {"count": 1, "examples": [".hidden/c.pdf"]},
                       "not_a_document": {"count": 1, "examples": ["notes.txt"]}}
    assert [d.doc_id for d in storage.list_documents(f"{base}/a.pdf")] == ["a.pdf"]  # a single object
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.list_documents_table(f"gs://{bucket}/nothing-here")

    out = f"gs://{bucket}/out/pages"
    storage.write_parquet(f"{out}/p1.parquet", pa.table({"a": [1, 2], "b": ["x", "y"]}), metadata={b"k": b"v"})
    storage.write_parquet(f"{out}/p2.parquet", pa.table({"a": [3], "b": ["z"]}))
    storage.write_bytes_atomic(f"{out}/_tmp.parquet", b"not parquet")  # temporary names are left out
    assert sorted(storage.read_columns(out, ["a", "missing"]).column("a").to_pylist()) == [1, 2, 3]
    fs, files = storage.list_files(out)
    assert [f.base_name for f in files] == ["p1.parquet", "p2.parquet"]
    footers = storage.read_footers(fs, [f.path for f in files])
    assert [m.num_rows for m in footers] == [2, 1] and footers[0].metadata[b"k"] == b"v"
    assert storage.read_parquet(f"{out}/p2.parquet").column("b").to_pylist() == ["z"]
    storage.write_json(f"gs://{bucket}/out/summary.json", {"n": 1})
    assert storage.read_json(f"gs://{bucket}/out/summary.json") == {"n": 1}
    assert storage.delete_files(out) == 2
    assert storage.read_columns(out, ["a"]) is None or storage.read_columns(out, ["a"]).num_rows == 0
    assert storage.clean_output_leftovers(f"gs://{bucket}/out") == {"temporary_files": 0, "multipart_uploads": 0}
    with pytest.raises(FileNotFoundError, match="bucket no-such-bucket-x does not exist"):
        storage.read_bytes("gs://no-such-bucket-x/a.pdf")


def test_output_lock_on_gcs_is_create_only(gcs):
    """The lock is written with GCS's create-only precondition (ifGenerationMatch=0, seen in
    the emulator's request log), a second run is refused naming the holder, an expired lock is
    taken over with a generation-conditioned delete, and release removes it."""
    bucket = gcs.make_bucket()
    out = f"gs://{bucket}/emb"
    lock = storage.acquire_output_lock(out, renew_s=3600)
    assert lock.kind == "gcs"
    try:
        assert gcs.keys(f"{bucket}/emb") == [f"{bucket}/emb/_lock.json"]
        with pytest.raises(storage.OutputLockedError, match=lock.run_id):
            storage.acquire_output_lock(out)
    finally:
        lock.release()
    assert gcs.keys(f"{bucket}/emb") == []
    uploads = [line for line in gcs.log().splitlines() if f"/b/{bucket}/o" in line and "POST" in line]
    # the lock is the only object written to this bucket so far (the object name is in the body)
    assert len(uploads) == 1 and "ifGenerationMatch=0" in uploads[0], uploads

    # a lock left by a dead run (expired) is taken over
    stale = {"run_id": "dead", "host": "elsewhere", "pid": 1, "expires_at_unix": time.time() - 5}
    storage.write_bytes_atomic(f"{out}/_lock.json", json.dumps(stale).encode())
    lock = storage.acquire_output_lock(out, renew_s=3600)
    try:
        held = json.loads(storage.read_bytes(f"{out}/_lock.json"))
        assert held["run_id"] == lock.run_id
    finally:
        lock.release()
    assert any("ifGenerationMatch=" in line and "DELETE" in line for line in gcs.log().splitlines())


def _pdfs(tmp_path, shared_corpora):
    """Three real PDFs: four pages, one page, and one that is not a PDF inside."""
    folder = tmp_path / "docs"
    os.makedirs(folder / "reports")
    shutil.copy(os.path.join(DATA, "004-pdflatex-4-pages_pdflatex-4-pages.pdf"), folder / "reports" / "four.pdf")
    shutil.copy(os.path.join(shared_corpora, "py-pdf-samples",
                             "002-trivial-libre-office-writer_002-trivial-libre-office-writer.pdf"),
                folder / "trivial.pdf")
    shutil.copy(os.path.join(DATA, "bad1.pdf"), folder / "bad1.pdf")
    return str(folder)


def test_embed_and_score_jobs_on_gcs(ray_session, tiny_model, gcs, tmp_path, shared_corpora):
    """Input, output, model and corpus on gs://: the embed job writes pages and error rows,
    a rerun writes nothing, the scoring job reads the gs:// corpus and writes its results."""
    from jobs import embed_corpus, score_queries

    bucket = gcs.make_bucket()
    gcs.upload(_pdfs(tmp_path, shared_corpora), f"gs://{bucket}/docs")
    gcs.upload(tiny_model, f"gs://{bucket}/models/tiny")  # fetch_model copies it from gs://
    argv = ["--input", f"gs://{bucket}/docs", "--output", f"gs://{bucket}/emb", "--model",
            f"gs://{bucket}/models/tiny", "--max-visual-tokens", TOKENS, "--batch-size", "4"]
    assert embed_corpus.main(argv) == 0
    keys = gcs.keys(f"{bucket}/emb")
    assert f"{bucket}/emb/summary.json" in keys and f"{bucket}/emb/_lock.json" not in keys
    summary = storage.read_json(f"gs://{bucket}/emb/summary.json")
    pages = storage.read_columns(f"gs://{bucket}/emb/pages", ["page_id", "source_uri", "n_vectors"])
    errors = storage.read_columns(f"gs://{bucket}/emb/errors", ["doc_id", "source_uri", "error_type"])
    assert sorted(pages.column("page_id").to_pylist()) == [f"reports/four.pdf#{i}" for i in (1, 2, 3, 4)] + \
        ["trivial.pdf#1"]
    assert f"gs://{bucket}/docs/reports/four.pdf" in pages.column("source_uri").to_pylist()
    assert errors.column("doc_id").to_pylist() == ["bad1.pdf"]
    assert errors.column("source_uri").to_pylist() == [f"gs://{bucket}/docs/bad1.pdf"]
    assert errors.column("error_type").to_pylist() == ["UnknownFormat"]
    assert summary["documents_listed"] == 3 and summary["this_run"]["pages"] == 5
    assert summary["this_run"]["error_rows"] == 1

    assert embed_corpus.main(argv) == 0  # a rerun: nothing new
    again = storage.read_json(f"gs://{bucket}/emb/summary.json")
    assert again["documents_processed"] == 0 and again["documents_already_done"] == 3
    assert again["this_run"]["pages"] == 0
    assert [k for k in gcs.keys(f"{bucket}/emb") if "/pages/" in k or "/errors/" in k] == \
        [k for k in keys if "/pages/" in k or "/errors/" in k]

    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query_id": "q1", "text": "four pages"}\n{"query_id": "q2", "text": "a trivial letter"}\n')
    gcs.upload(str(queries), f"gs://{bucket}/q.jsonl")
    assert score_queries.main(["--corpus", f"gs://{bucket}/emb", "--queries", f"gs://{bucket}/q.jsonl",
                               "--output", f"gs://{bucket}/scores", "--top-k", "2",
                               "--model", f"gs://{bucket}/models/tiny"]) == 0
    results = storage.read_parquet(f"gs://{bucket}/scores/results.parquet")
    assert results.column("query_id").to_pylist() == ["q1", "q1", "q2", "q2"]
    assert results.column("rank").to_pylist() == [1, 2, 1, 2]
    assert set(results.column("page_id").to_pylist()) <= set(pages.column("page_id").to_pylist())
    assert {f"{bucket}/scores/{n}" for n in ("run.trec", "query_embeddings.parquet", "summary.json")} \
        <= set(gcs.keys(f"{bucket}/scores"))


def _run_without_storage(args: list[str], extra_env: dict, home: str) -> subprocess.Popen:
    """A job in a fresh process whose environment holds no Google credentials at all (no
    key file, no gcloud config, the metadata server on a closed loopback port)."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": ROOT, "HOME": home,
           "CLOUDSDK_CONFIG": os.path.join(home, "gcloud"), "NO_GCE_CHECK": "True",
           "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
           "RAY_ADDRESS": "127.0.0.1:9", **extra_env}  # no Ray is started before storage is checked
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_gcs_without_credentials_or_endpoint_fails_in_seconds(tiny_model, tmp_path):
    """No credentials: one message naming the URI and what to set, in seconds (it used to wait
    12 minutes for a metadata server, silently). An emulator that does not answer: the same."""
    home = str(tmp_path / "home")
    os.makedirs(home)
    embed = ["jobs.embed_corpus", "--input", "gs://some-bucket/docs", "--output", "gs://some-bucket/emb",
             "--model", tiny_model]
    score = ["jobs.score_queries", "--corpus", "gs://some-bucket/emb", "--queries", "gs://some-bucket/q.jsonl",
             "--output", "gs://some-bucket/scores", "--top-k", "3"]
    cases = {
        "embed, no credentials": (embed, {}),
        "score, no credentials": (score, {}),
        "embed, emulator down": (embed, {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}),
    }
    t0 = time.monotonic()
    procs = {name: _run_without_storage(args, env, home) for name, (args, env) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        print(f"{name}: exit {proc.returncode} after {elapsed:.1f} s")
        assert proc.returncode == 2, (name, err[-3000:])
        assert elapsed < 20, (name, elapsed)
        message = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(message) == 1 and "gs://some-bucket/" in message[0], (name, err[-3000:])
        if "no credentials" in name:
            assert "no Google Cloud credentials" in message[0]
            for what in ("GOOGLE_APPLICATION_CREDENTIALS", "workload identity", "STORAGE_EMULATOR_HOST"):
                assert what in message[0]
        else:
            assert "no answer from the GCS emulator at http://127.0.0.1:9" in message[0]
        assert "Traceback" not in err
