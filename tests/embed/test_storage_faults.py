"""The corpus job against a real S3 endpoint that fails: moto's server as its own process
(paused with SIGSTOP/SIGCONT), behind a small HTTP fault proxy on 127.0.0.1 that can answer
500 InternalError / 503 SlowDown, or vanish (connections refused). After each fault a plain
rerun leaves exactly the rows of a clean run.

Timeouts are set short (``--storage-timeout-s 2 --storage-attempts 4``) so that stalls of a
few seconds exercise the same retry paths as production's minute-long ones."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from jobs import embed_corpus
from pipeline import cli, schema, storage
from pipeline.devtools.local_cluster import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUTS = ["--storage-timeout-s", "2", "--storage-attempts", "4"]
REAL_PDFS = ("002-trivial-libre-office-writer_002-trivial-libre-office-writer.pdf",
             "016-libre-office-link_libre-office-link.pdf", "024-annotations_annotated_pdf.pdf")


# ----------------------------------------------------------------------------- fixtures

class MotoProcess:
    """``python -m moto.server`` in its own process, so that it can be paused."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=2)
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.3)
        self.pauses: list[float] = []

    def pause_for(self, seconds: float) -> None:
        """SIGSTOP now, SIGCONT after ``seconds`` (from a timer thread)."""
        self.proc.send_signal(signal.SIGSTOP)
        self.pauses.append(seconds)
        threading.Timer(seconds, lambda: self.proc.send_signal(signal.SIGCONT)).start()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(timeout=30)


class FaultProxy:
    """A real HTTP endpoint in front of moto. Each request is matched against ``rules``
    (callables ``(method, path) -> None | (status, code) | "hook"``) before it is forwarded."""

    def __init__(self, upstream_port: int, port: int | None = None):
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rules: list = []
        self.seen: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self.dead = False
        self.server = None
        self.start()

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        chunk = self.rfile.read(size + 2) if size else b""
                        raw += chunk
                        if size == 0:
                            while True:  # trailers up to the empty line
                                t = self.rfile.readline()
                                raw += t
                                if t in (b"\r\n", b"\n", b""):
                                    return raw
                    # unreachable
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                if proxy.dead:
                    self.close_connection = True
                    self.connection.close()
                    return
                action = None
                with proxy.lock:
                    for rule in list(proxy.rules):
                        action = rule(self.command, self.path)
                        if action is not None:
                            break
                if isinstance(action, tuple):
                    status, code = action
                    proxy.seen.append((self.command, self.path, status))
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected '
                           f'{code}</Message><RequestId>fault-proxy</RequestId></Error>').encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if proxy.dead:
                    self.connection.close()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.endheaders()
                if body:
                    conn.send(body)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                proxy.seen.append((self.command, self.path, resp.status))
                try:
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (its timeout) while upstream was paused

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.dead = False
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self) -> None:
        """The endpoint is gone: new connections refused, open ones dropped."""
        self.dead = True
        threading.Thread(target=self._close, daemon=True).start()

    def _close(self):
        self.server.shutdown()
        self.server.server_close()

    def on_first(self, match, hook) -> None:
        fired = []

        def rule(method, path):
            if not fired and match(method, path):
                fired.append(1)
                hook()
            return None

        self.rules.append(rule)

    def fail(self, match, status: int, code: str, times: int | None) -> None:
        left = [times]

        def rule(method, path):
            if match(method, path) and (left[0] is None or left[0] > 0):
                if left[0] is not None:
                    left[0] -= 1
                return status, code
            return None

        self.rules.append(rule)

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()


@pytest.fixture(scope="module")
def moto_proc(s3):  # s3: the session's fake AWS credentials in the environment
    server = MotoProcess()
    yield server
    server.stop()


@pytest.fixture
def proxy(moto_proc):
    p = FaultProxy(moto_proc.port)
    yield p
    p.clear()
    if not p.dead:
        p.kill()
    storage.configure(storage.DEFAULT_TIMEOUT_S, storage.DEFAULT_ATTEMPTS)  # the driver's settings back


@pytest.fixture(scope="module")
def corpus(moto_proc, shared_corpora, tmp_path_factory):
    """Three small real PDFs and a text file named .pdf, in a bucket of the moto process."""
    import boto3

    folder = tmp_path_factory.mktemp("fault-corpus")
    for name in REAL_PDFS:
        shutil.copy(os.path.join(shared_corpora, "py-pdf-samples", name), folder / name)
    (folder / "notes.pdf").write_text("this is a text file with a .pdf name\n")
    client = boto3.client("s3", endpoint_url=moto_proc.url, region_name="us-east-1")
    client.create_bucket(Bucket="faults")
    for f in sorted(os.listdir(folder)):
        client.upload_file(str(folder / f), "faults", f"in/{f}")
    return "s3://faults/in"


def run(proxy, out, model, *extra, expect=0):
    argv = ["--input", "s3://faults/in", "--output", f"s3://faults/{out}", "--model", model,
            "--max-visual-tokens", "64", "--batch-size", "4", "--rows-per-file", "2", "--docs-per-render-task", "1",
            "--endpoint-url", proxy.url, *TIMEOUTS, *extra]
    rc = cli.guarded(embed_corpus.main, argv, prog="embed_corpus")
    assert rc == expect
    if rc:
        return None
    return storage.read_json(f"s3://faults/{out}/summary.json", proxy.url)


def rows(proxy, out):
    """(page rows, error rows) of an output, sorted, comparable across runs."""
    pages = storage.read_columns(f"s3://faults/{out}/pages",
                                 [schema.PAGE_ID, schema.DOC_ID, schema.PAGE_NUMBER, schema.N_VECTORS,
                                  schema.WIDTH, schema.HEIGHT, schema.EMBEDDING], proxy.url)
    errors = storage.read_columns(f"s3://faults/{out}/errors",
                                  [schema.DOC_ID, schema.PAGE_NUMBER, schema.STAGE, schema.ERROR_TYPE, schema.MESSAGE],
                                  proxy.url)
    p = sorted(pages.to_pylist(), key=lambda r: r[schema.PAGE_ID]) if pages is not None else []
    e = sorted(errors.to_pylist(), key=lambda r: (r[schema.DOC_ID], r[schema.PAGE_NUMBER] or 0)) if errors is not None else []
    return p, e


def assert_same_rows(got, want):
    (gp, ge), (wp, we) = got, want
    assert ge == we
    assert [r[schema.PAGE_ID] for r in gp] == [r[schema.PAGE_ID] for r in wp]
    for g, w in zip(gp, wp):
        assert (g[schema.N_VECTORS], g[schema.WIDTH], g[schema.HEIGHT]) == (w[schema.N_VECTORS], w[schema.WIDTH], w[schema.HEIGHT])
        assert np.abs(np.asarray(g[schema.EMBEDDING], np.float32) - np.asarray(w[schema.EMBEDDING], np.float32)).max() < 2e-3


@pytest.fixture(scope="module")
def clean(moto_proc, corpus, ray_session, tiny_model):
    """The output of a run with no fault, to compare against."""
    p = FaultProxy(moto_proc.port)
    try:
        summary = run(p, "clean", tiny_model)
        assert summary["this_run"]["error_rows_retryable"] == 0
        return rows(p, "clean")
    finally:
        p.kill()
        storage.configure(storage.DEFAULT_TIMEOUT_S, storage.DEFAULT_ATTEMPTS)


def _input_read(method, path):
    return method in ("GET", "HEAD") and path.startswith("/faults/in/") and path.endswith(".pdf")


def _pages_write(method, path):
    return method in ("PUT", "POST") and path.startswith("/faults/") and "/pages/part-" in path


# ----------------------------------------------------------------------------- tests

def test_clean_run_has_one_final_error_with_a_stable_message(clean):
    pages, errors = clean
    assert len({r[schema.DOC_ID] for r in pages}) == 3
    assert [(e[schema.DOC_ID], e[schema.ERROR_TYPE]) for e in errors] == [("notes.pdf", "UnknownFormat")]
    assert " at 0x" not in errors[0][schema.MESSAGE]


def test_stalls_while_reading_and_writing_are_ridden_out(proxy, moto_proc, clean, tiny_model):
    """moto is paused (SIGSTOP) for 5 s at the first read of a document and again at the first
    write of a pages file: requests time out after 2 s and are retried by the client library;
    no document becomes an error row and the job succeeds."""
    proxy.on_first(_input_read, lambda: moto_proc.pause_for(5))
    proxy.on_first(_pages_write, lambda: moto_proc.pause_for(5))
    t0 = time.monotonic()
    summary = run(proxy, "stalls", tiny_model)
    print(f"stalled run: {time.monotonic() - t0:.1f} s")
    assert len(moto_proc.pauses) >= 2
    assert summary["this_run"]["error_rows_retryable"] == 0
    assert summary["this_run"]["errors_by_type"] == {"UnknownFormat": 1}
    assert_same_rows(rows(proxy, "stalls"), clean)
    again = run(proxy, "stalls", tiny_model)  # a plain rerun: nothing to do, same rows
    assert again["documents_processed"] == 0
    assert_same_rows(rows(proxy, "stalls"), clean)


def test_throttling_and_500s_are_retried_and_a_persistent_failure_is_redone_by_a_plain_rerun(
        proxy, clean, tiny_model):
    """503 SlowDown on one document's first reads and 500s on the first five page writes are
    retried (the client library, then Ray for the write task); a document whose reads fail
    every time becomes a retryable StorageUnavailable row, counted apart from final errors.
    A plain rerun redoes it and leaves exactly the clean run's rows, no stale error row."""
    throttled, broken = f"/faults/in/{REAL_PDFS[0]}", f"/faults/in/{REAL_PDFS[1]}"
    proxy.fail(lambda m, p: m in ("GET", "HEAD") and p.startswith(throttled), 503, "SlowDown", times=2)
    proxy.fail(lambda m, p: m in ("GET", "HEAD") and p.startswith(broken), 500, "InternalError", times=None)
    proxy.fail(_pages_write, 500, "InternalError", times=5)
    summary = run(proxy, "flaky", tiny_model)
    assert sum(1 for m, p, s in proxy.seen if s == 503) == 2
    assert sum(1 for m, p, s in proxy.seen if s == 500 and "/pages/" in p) == 5
    this = summary["this_run"]
    assert this["errors_by_type"] == {"UnknownFormat": 1, "StorageUnavailable": 1}
    assert (this["error_rows_final"], this["error_rows_retryable"]) == (1, 1)
    assert (summary["output_totals"]["error_rows_final"], summary["output_totals"]["error_rows_retryable"]) == (1, 1)
    _, errors = rows(proxy, "flaky")
    row = [e for e in errors if e[schema.ERROR_TYPE] == "StorageUnavailable"][0]
    assert row[schema.DOC_ID] == REAL_PDFS[1] and row[schema.STAGE] == "read"
    assert f"s3://faults/in/{REAL_PDFS[1]}" in row[schema.MESSAGE] and proxy.url in row[schema.MESSAGE]
    assert " at 0x" not in row[schema.MESSAGE]

    proxy.clear()
    again = run(proxy, "flaky", tiny_model)  # plain rerun, no --retry-errors
    assert again["documents_processed"] == 1 and again["retryable_error_rows_redone"] == 1
    assert again["output_totals"]["error_rows_retryable"] == 0
    assert_same_rows(rows(proxy, "flaky"), clean)


def test_endpoint_lost_mid_run_ends_with_one_line_and_a_plain_rerun_completes(proxy, clean, tiny_model, capsys):
    """The endpoint vanishes when the first pages file is written: the job ends with exit 1
    and one line naming the URI and the endpoint; once it is back, a plain rerun (same
    process, so the lock the dead run could not delete must not block it) completes the output."""
    writes = []

    def hook(method, path):
        if _pages_write(method, path):
            writes.append(path)
            if len(writes) == 1:  # the endpoint dies now, for every request from here on
                proxy.kill()
        return None

    proxy.rules.append(hook)
    t0 = time.monotonic()
    assert run(proxy, "lost", tiny_model, expect=1) is None
    took = time.monotonic() - t0
    print(f"run that lost its endpoint: {took:.1f} s")
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith("error: StorageUnavailableError: could not write s3://faults/lost/"), last
    assert proxy.url in last
    assert not any(line.startswith("Traceback") for line in err)
    assert took < 120

    proxy.clear()
    proxy.start()  # the endpoint is back, same address
    summary = run(proxy, "lost", tiny_model)
    assert summary["output_totals"]["error_rows_retryable"] == 0
    assert_same_rows(rows(proxy, "lost"), clean)


def test_endpoint_down_at_start_fails_in_seconds_with_one_line(moto_proc, corpus, tiny_model, tmp_path):
    """Nothing listens at the endpoint, or it accepts but never answers (paused): the job
    fails before Ray starts, in seconds, with one line naming the input and the endpoint."""
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": "", "PIPELINE_STORAGE_ATTEMPTS": "2"}
    closed = f"http://127.0.0.1:{free_port()}"
    for endpoint, pause in ((closed, False), (moto_proc.url, True)):
        if pause:
            moto_proc.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "jobs.embed_corpus", "--input", "s3://faults/in",
                                   "--output", "s3://faults/down", "--model", tiny_model, "--endpoint-url", endpoint,
                                   *TIMEOUTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        finally:
            if pause:
                moto_proc.proc.send_signal(signal.SIGCONT)
        took = time.monotonic() - t0
        print(f"endpoint {'paused' if pause else 'closed'}: failed in {took:.1f} s")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert lines[-1].startswith("error: could not list --input s3://faults/in (endpoint " + endpoint), lines[-1]
        assert "Traceback" not in proc.stderr
        assert "Started a local Ray instance" not in proc.stderr and took < 30
