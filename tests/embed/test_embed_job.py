"""The corpus job end to end on a real local Ray, real files, a real S3 endpoint and the
tiny ColQwen2: outputs follow DESIGN.md, nothing is lost, reruns are idempotent."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import embed_corpus
from pipeline.embed import plan
from pipeline import schema
from pipeline.storage import list_documents

TOKENS = "64"  # small pages keep the CPU tests fast; the code path is the same as 768
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_job(inp, out, model, *extra):
    argv = ["--input", inp, "--output", out, "--model", model, "--max-visual-tokens", TOKENS,
            "--batch-size", "4", *extra]
    assert embed_corpus.main(argv) == 0
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def read_dir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".parquet") and not f.startswith(".")) \
        if os.path.isdir(path) else []
    if not files:
        return None, files
    return pa.concat_tables([pq.read_table(os.path.join(path, f)) for f in files]), files


@pytest.fixture(scope="module")
def first_run(ray_session, tiny_model, sample_corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("emb") / "out")
    # Two batches in flight per actor (two threads): the later tests check its embeddings
    # against the model and its counters; the reruns below use the default of one.
    summary = run_job(sample_corpus, out, tiny_model, "--rows-per-file", "3", "--docs-per-render-task", "1",
                      "--batches-in-flight", "2")
    assert summary["batches_in_flight"] == 2
    return out, summary


def test_every_document_ends_as_pages_or_errors(first_run, sample_corpus):
    out, summary = first_run
    pages, _ = read_dir(os.path.join(out, "pages"))
    errors, _ = read_dir(os.path.join(out, "errors"))
    listed = {d.doc_id for d in list_documents(sample_corpus)}
    with_pages = set(pages.column("doc_id").to_pylist())
    with_errors = set(errors.column("doc_id").to_pylist())
    assert with_pages | with_errors == listed
    assert not with_pages & with_errors  # the sample has no partly failing document
    errs = dict(zip(errors.column("doc_id").to_pylist(), errors.column("error_type").to_pylist()))
    assert errs == {"reports/truncated.pdf": "CorruptDocument", "scans/empty.png": "EmptyFile"}
    assert summary["documents_listed"] == len(listed) == 7
    assert summary["this_run"]["pages"] == pages.num_rows == 3 + 1 + 1 + 1 + 2
    assert summary["this_run"]["errors_by_type"] == {"CorruptDocument": 1, "EmptyFile": 1}
    assert summary["output_totals"]["vectors"] == sum(pages.column("n_vectors").to_pylist())


def test_summary_reports_each_actor_from_its_own_counters(first_run):
    """Per actor: pages, forward time, wall time since its first batch; no figure above what
    the actors did (the job's rate counts start-up, so it is below the actors' own)."""
    out, summary = first_run
    run = summary["this_run"]
    actors = run["actors"]
    assert actors and sum(a["pages"] for a in actors) == run["pages"]
    for a in actors:
        assert a["actor"].count(":") == 1 and a["model_load_s"] > 0
        assert 0 < a["gpu_busy_s"] <= a["wall_s"] and 0 < a["gpu_busy_fraction"] <= 1
        assert a["pages_per_second"] == pytest.approx(a["pages"] / a["wall_s"], rel=1e-2)
        assert 0 <= a["first_batch_after_s"] <= run["seconds"]
        assert a["first_batch_after_s"] + a["wall_s"] <= run["seconds"]
        # The first batch (torch.compile's compilation on GPUs) is reported apart.
        assert 0 < a["first_batch_s"] <= a["wall_s"]
        if "after_first_batch" in a:
            assert 0 < a["after_first_batch"]["gpu_busy_fraction"] <= 1
        # Where the actor's start went: its constructor began in the job, loaded the model (by
        # step), and its first batch began after the load, all on the job's clock.
        start = a["start"]
        assert 0 <= start["started_after_s"] < a["first_batch_after_s"]
        assert {"import", "from_pretrained", "to_device", "processor", "setup"} <= set(start["load_phases_s"])
        assert sum(start["load_phases_s"].values()) <= a["model_load_s"] + 0.01
        assert 0 <= start["load_to_first_batch_s"] and start["started_after_s"] + a["model_load_s"] + \
            start["load_to_first_batch_s"] == pytest.approx(a["first_batch_after_s"], abs=0.01)
        assert "start" not in a["compile"]
    assert run["pages_per_second"] <= run["actor_pages_per_second"]
    assert "steady_pages_per_second" not in run  # counted from when files landed: it could exceed the actors
    # Rendering is spread over render tasks of one document each (--docs-per-render-task 1),
    # which Ray runs side by side. Before, Ray Data packed the plan task's whole output into
    # one block, so one render task rendered every document on one core and the GPU waited
    # (RESULTS.md).
    assert run["render_tasks"] >= 4 and 1 <= run["render_workers"] <= run["render_tasks"]
    assert run["embedding_actors"] == {"min": 1, "max": 1}  # the pool's size, labelled (was a bare pair)
    # A job that starts its own model actor prestarts no CPU workers: they delayed the actor's
    # start, which the job waits for (RESULTS "Tenth session"); only a job whose kept actors
    # are already running does (test_kept_embedders_serve_the_next_job_and_end_when_idle).
    assert summary["workers_prestarted"] == 0 and summary["prestarted_workers_rendered"] == 0
    # No counter column reaches the output files.
    pages, _ = read_dir(os.path.join(out, "pages"))
    assert not [c for c in pages.column_names if c.startswith("_")]


def test_page_rows_follow_the_contract(first_run):
    out, _ = first_run
    t, files = read_dir(os.path.join(out, "pages"))
    assert t.schema.field("embedding").type == pa.list_(pa.list_(pa.float16(), 128))
    for name, typ in [("doc_id", pa.string()), ("page_number", pa.int32()), ("page_id", pa.string()),
                      ("source_uri", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                      ("n_vectors", pa.int32())]:
        assert t.schema.field(name).type == typ
    rows = t.to_pylist()
    assert sorted(r["page_id"] for r in rows) == sorted(f"{r['doc_id']}#{r['page_number']}" for r in rows)
    assert len({r["page_id"] for r in rows}) == len(rows)
    fax = sorted(r["page_number"] for r in rows if r["doc_id"] == "scans/fax.tiff")
    assert fax == [1, 2]
    for r in rows:
        assert len(r["embedding"]) == r["n_vectors"] > 0
        assert r["width"] % 28 == 0 and r["height"] % 28 == 0
        assert (r["width"] // 28) * (r["height"] // 28) <= int(TOKENS)
        assert r["source_uri"].endswith(r["doc_id"])
        v = np.asarray(r["embedding"], dtype=np.float32)
        assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=2e-3)
    meta = pq.read_schema(os.path.join(out, "pages", files[0])).metadata
    assert meta[schema.META_MAX_VISUAL_TOKENS] == TOKENS.encode()
    assert meta[schema.META_DTYPE] == b"float32"
    assert b"<|image_pad|>" in meta[schema.META_PROMPT] and meta[schema.META_QUERY_PROMPT].startswith(b"Query: ")
    # plain pyarrow, pandas and a later reader see ordinary nested lists, not extension types
    assert t.to_pandas()["embedding"].iloc[0].shape[0] == rows[0]["n_vectors"]


def test_stored_embeddings_equal_the_model_on_the_same_page(first_run, sample_corpus, tiny_model):
    from pipeline.embed.model import embed_pages, load_model
    from pipeline.embed.rasterize import PageItem, RenderSpec, iter_document

    out, _ = first_run
    t, _ = read_dir(os.path.join(out, "pages"))
    row = [r for r in t.to_pylist() if r["page_id"] == "reports/2023/annual.pdf#2"][0]
    with open(os.path.join(sample_corpus, "reports/2023/annual.pdf"), "rb") as f:
        page = [i for i in iter_document(f.read(), RenderSpec(max_visual_tokens=int(TOKENS))) if isinstance(i, PageItem)][1]
    want = embed_pages(load_model(tiny_model, device="cpu"), [page.image])[0]
    got = np.asarray(row["embedding"], dtype=np.float32)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-3  # float16 storage of values in [-1, 1]


def test_preflight_counts_what_a_run_writes_and_writes_nothing_else(first_run, sample_corpus, tiny_model, tmp_path,
                                                                    capsys):
    """--preflight on a new output: the pages and error rows (by type) that the real run
    wrote, with no model loaded and nothing in OUT/pages or OUT/errors; on the run's own
    output: everything already done, and preflight.json does not count as progress."""
    out, summary = first_run
    fresh = str(tmp_path / "fresh")
    argv = ["--input", sample_corpus, "--model", tiny_model, "--max-visual-tokens", TOKENS, "--preflight"]
    assert embed_corpus.main([*argv, "--output", fresh]) == 0
    assert sorted(os.listdir(fresh)) == ["preflight.json"]
    with open(os.path.join(fresh, "preflight.json")) as f:
        report = json.load(f)
    errors, _ = read_dir(os.path.join(out, "errors"))
    assert report["documents_listed"] == report["documents_to_do"] == summary["documents_listed"] == 7
    assert report["pages"] == summary["this_run"]["pages"] == 8
    assert report["errors_by_type"] == summary["this_run"]["errors_by_type"] == {"CorruptDocument": 1, "EmptyFile": 1}
    assert report["error_rows"] == errors.num_rows == 2
    # the two broken files give no page: told apart from the documents rendered
    assert report["documents_rendered"] == 7 and report["documents_failed"] == 2
    assert report["error_examples"]["CorruptDocument"][0]["doc_id"] == "reports/truncated.pdf"
    assert report["bytes_read"] == sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sample_corpus)
                                       for f in fs)
    assert 0 < report["cpu_ms_per_page"] < 5000
    # GPU-hours: the H200 rate scaled by the token budget, or the rate given
    assert report["gpu_pages_per_second"] == pytest.approx(65.6 * 768 / int(TOKENS), rel=1e-3)
    assert report["gpu_hours"] == pytest.approx(8 / report["gpu_pages_per_second"] / 3600, abs=1e-4)
    printed = capsys.readouterr()
    assert json.loads(printed.out)["pages"] == 8 and "GPU-hours" in printed.err and "truncated.pdf" in printed.err
    assert "2 would give no page, only error rows" in printed.err

    listing = {d: sorted(os.listdir(os.path.join(out, d))) for d in ("pages", "errors")}
    with open(os.path.join(out, "summary.json")) as f:
        run_summary = f.read()
    assert embed_corpus.main([*argv, "--output", out, "--gpu-pages-per-second", "2"]) == 0
    with open(os.path.join(out, "preflight.json")) as f:
        again = json.load(f)
    assert again["documents_already_done"] == 7 and again["documents_to_do"] == again["pages"] == 0
    assert again["gpu_pages_per_second"] == 2 and again["gpu_hours"] == 0
    table = capsys.readouterr().err  # nothing rendered: no rate, said as "-" (it printed nan)
    assert again["cpu_ms_per_page"] is None and "nan" not in table and re.search(r"CPU ms per page +- ", table)
    assert {d: sorted(os.listdir(os.path.join(out, d))) for d in ("pages", "errors")} == listing
    with open(os.path.join(out, "summary.json")) as f:
        assert f.read() == run_summary


def _model_actors(dashboard_url: str) -> set[str]:
    """Ids of every actor Ray has held for the model stage (alive or dead)."""
    from ray.util.state import list_actors

    for attempt in range(6):  # the dashboard's state API can be slow to answer on 2 busy cores
        try:
            actors = list_actors(address=dashboard_url, limit=10000, timeout=60, raise_on_missing_output=False)
            break
        except Exception:  # noqa: BLE001 - tried again; the last attempt's error is raised
            if attempt == 5:
                raise
            time.sleep(5)
    return {a.actor_id for a in actors if "PageEmbedder" in a.class_name}


def test_rerun_writes_nothing_new(first_run, tiny_model, sample_corpus, ray_cluster, kept_actors):
    out, _ = first_run
    before = sorted(os.listdir(os.path.join(out, "pages"))) + sorted(os.listdir(os.path.join(out, "errors")))
    actors_before = _model_actors(ray_cluster["dashboard_url"])
    assert actors_before, "the first run's model actors should be listed"
    summary = run_job(sample_corpus, out, tiny_model, "--rows-per-file", "3")
    after = sorted(os.listdir(os.path.join(out, "pages"))) + sorted(os.listdir(os.path.join(out, "errors")))
    assert before == after
    assert summary["documents_processed"] == 0 and summary["documents_already_done"] == 7
    assert summary["this_run"]["pages"] == 0
    # nothing to do: no model actor was started (on a cluster it would have asked for a GPU node)
    assert _model_actors(ray_cluster["dashboard_url"]) == actors_before
    # nor a kept one with --keep-embedders (it would have held a GPU for its keep-alive)
    from pipeline.embed.flow import KEPT_EMBEDDER_NAMESPACE

    kept = kept_actors(KEPT_EMBEDDER_NAMESPACE)
    again = run_job(sample_corpus, out, tiny_model, "--rows-per-file", "3", "--keep-embedders", "30")
    assert again["documents_processed"] == 0 and again["documents_already_done"] == 7
    assert kept() == [] and again["embedders_reused"] == 0


def test_a_job_warns_of_nothing_in_our_own_calls(ray_session, tiny_model, sample_corpus, tmp_path):
    """Ray 2.60 deprecates map_batches' ray_remote_args(_fn), with no named parameter for a task's
    retries yet: every job printed two RayDeprecationWarnings that no user can act on."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_job(sample_corpus, str(tmp_path / "out"), tiny_model)
    assert summary["this_run"]["pages"] == 8
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if "ray_remote_args" in str(w.message) or os.path.join("pipeline", "") in w.filename]
    assert ours == []


def test_crash_leftovers_are_redone_without_duplicates(ray_session, tiny_model, sample_corpus, tmp_path):
    out = str(tmp_path / "out")
    run_job(sample_corpus, out, tiny_model, "--rows-per-file", "3")
    full, files = read_dir(os.path.join(out, "pages"))
    # A crash between two writes: one file never landed, and a temp file was left behind.
    victim = files[0]
    lost = pq.read_table(os.path.join(out, "pages", victim)).num_rows
    os.remove(os.path.join(out, "pages", victim))
    with open(os.path.join(out, "pages", ".tmp-123-part-x.parquet"), "wb") as f:
        f.write(b"PAR1 half written")
    summary = run_job(sample_corpus, out, tiny_model, "--rows-per-file", "3")
    assert summary["this_run"]["pages"] == lost  # only what was missing
    again, _ = read_dir(os.path.join(out, "pages"))
    assert sorted(again.column("page_id").to_pylist()) == sorted(full.column("page_id").to_pylist())
    # what users run reads the folder as it is, temp leftovers included: hidden files are skipped
    assert pq.read_table(os.path.join(out, "pages")).num_rows == full.num_rows


def test_new_documents_are_the_only_ones_embedded(ray_session, tiny_model, sample_corpus, tmp_path):
    corpus = str(tmp_path / "corpus")
    shutil.copytree(sample_corpus, corpus)
    out = str(tmp_path / "out")
    run_job(corpus, out, tiny_model)
    shutil.copy(os.path.join(corpus, "scans", "letter.png"), os.path.join(corpus, "scans", "letter-copy.png"))
    summary = run_job(corpus, out, tiny_model)
    assert summary["documents_processed"] == 1 and summary["this_run"]["pages"] == 1
    pages, _ = read_dir(os.path.join(out, "pages"))
    ids = pages.column("page_id").to_pylist()
    assert len(ids) == len(set(ids)) and "scans/letter-copy.png#1" in ids


def test_s3_input_and_output(ray_session, tiny_model, sample_corpus, s3, capsys):
    import pyarrow.dataset as pads

    from pipeline.storage import open_filesystem

    bucket = s3.make_bucket()
    s3.upload_folder(sample_corpus, bucket, "docs/")
    argv = ["--input", f"s3://{bucket}/docs/", "--output", f"s3://{bucket}/emb", "--model", tiny_model,
            "--max-visual-tokens", TOKENS, "--endpoint-url", s3.endpoint_url]
    assert embed_corpus.main(argv) == 0
    keys = s3.keys(bucket, "emb/")
    assert "emb/summary.json" in keys and any(k.startswith("emb/pages/part-") for k in keys)
    fs, path = open_filesystem(f"s3://{bucket}/emb/pages")
    t = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert t.num_rows == 8
    assert set(t.column("source_uri").to_pylist()) >= {f"s3://{bucket}/docs/reports/invoice.pdf"}
    printed = capsys.readouterr()
    assert "testing-secret-not-for-logs" not in printed.out + printed.err
    for k in keys:
        body = s3.client().get_object(Bucket=bucket, Key=k)["Body"].read()
        assert b"testing-secret-not-for-logs" not in body


def test_real_broken_pdfs_never_crash_or_vanish(ray_session, tiny_model, shared_corpora, tmp_path):
    corpus = tmp_path / "corpus"
    for sub in ("qpdf", "pdfium", "py-pdf-samples"):
        names = sorted(os.listdir(os.path.join(shared_corpora, sub)))[::12]
        for n in names:
            os.makedirs(corpus / sub, exist_ok=True)
            shutil.copy(os.path.join(shared_corpora, sub, n), corpus / sub / n)
    out = str(tmp_path / "out")
    summary = run_job(str(corpus), out, tiny_model, "--max-pages-per-doc", "1", "--all-files",
                      "--docs-per-render-task", "8", "--batch-size", "8")
    pages, _ = read_dir(os.path.join(out, "pages"))
    errors, _ = read_dir(os.path.join(out, "errors"))
    listed = {d.doc_id for d in list_documents(str(corpus), extensions=None)}
    seen = set(pages.column("doc_id").to_pylist() if pages else []) | set(errors.column("doc_id").to_pylist())
    assert seen == listed and summary["documents_listed"] == len(listed)
    assert summary["this_run"]["errors_by_type"].get("EncryptedDocument", 0) >= 1


def test_help_teaches_and_bad_options_fail_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        embed_corpus.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--model", "--max-visual-tokens", "--max-actors", "--batch-size",
                 "--endpoint-url", "reruns"):
        assert flag in text
    with pytest.raises(SystemExit) as e:
        embed_corpus.main(["--input", "a", "--output", "b", "--max-visual-tokens", "2"])
    assert e.value.code == 2 and "--max-visual-tokens must be >= 4" in capsys.readouterr().err


def test_missing_input_is_a_clear_error(ray_session, tmp_path, tiny_model, capsys):
    rc = embed_corpus.main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"), "--model", tiny_model])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_ray_job_submit_path(submit_job, tiny_model, sample_corpus, tmp_path):
    out = str(tmp_path / "out")
    proc = submit_job(["jobs.embed_corpus", "--input", sample_corpus, "--output", out, "--model", tiny_model,
                       "--max-visual-tokens", TOKENS])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["this_run"]["pages"] == 8


def test_output_reads_back_for_analysis(first_run):
    """pipeline.analysis (the notebooks' readers) on a real output: counts, error advice, and
    the run's summary kept in summaries/ beside summary.json. The notebooks themselves run in
    tests/analysis/test_notebooks.py."""
    from pipeline.analysis import corpus, inputs

    out, _ = first_run
    pages = inputs.read_pages(out, ["doc_id", "n_vectors"])
    errors = inputs.read_errors(out)
    assert corpus.overview(pages, errors)["pages"] == 8 and errors.num_rows == 2
    assert all(r["what_to_do"] for r in corpus.error_summary(errors).to_pylist())
    kept = inputs.read_summaries(out)
    with open(os.path.join(out, "summary.json")) as f:
        assert kept[-1] == json.load(f)


def test_retry_errors_redoes_only_failed_documents(ray_session, tiny_model, sample_corpus, tmp_path):
    out = str(tmp_path / "out")
    run_job(sample_corpus, out, tiny_model)
    errors_before, _ = read_dir(os.path.join(out, "errors"))
    pages_before, page_files = read_dir(os.path.join(out, "pages"))
    summary = run_job(sample_corpus, out, tiny_model, "--retry-errors")
    assert summary["documents_processed"] == 2 and summary["this_run"]["pages"] == 0
    errors_after, _ = read_dir(os.path.join(out, "errors"))
    assert sorted(errors_after.column("doc_id").to_pylist()) == sorted(errors_before.column("doc_id").to_pylist())
    assert read_dir(os.path.join(out, "pages"))[1] == page_files


def test_a_wrong_model_fails_in_seconds_before_any_rendering(tiny_model, sample_corpus, tmp_path, capsys,
                                                             monkeypatch):
    """A typo, a folder without weights, or a checkpoint that is not ColQwen2: exit 2 with a
    message that names the model, before Ray or any rendering starts, and nothing written.
    Relative paths count as paths where no hub id can be one (they used to go to the actors,
    which tried the Hub)."""
    import time

    monkeypatch.chdir(tmp_path)
    (tmp_path / "vidore").mkdir()  # a data folder named like the hub org: the hub id stays a hub id
    assert "Hugging Face Hub name" in plan.check_model("vidore/colqwen2-v1.0-hf")

    not_colqwen = tmp_path / "bert"
    not_colqwen.mkdir()
    (not_colqwen / "config.json").write_text('{"model_type": "bert"}')
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    shutil.copy(os.path.join(tiny_model, "config.json"), no_weights / "config.json")
    cases = [(str(tmp_path / "tiny-colqwen"), "no config.json"), (str(not_colqwen), "not a ColQwen2 checkpoint"),
             (str(no_weights), "no weights"), ("checkpoints/tiny/colqwen", "no config.json")]
    for model, why in cases:
        out = tmp_path / "out"
        t0 = time.monotonic()
        assert embed_corpus.main(["--input", sample_corpus, "--output", str(out), "--model", model]) == 2
        assert time.monotonic() - t0 < 10
        err = capsys.readouterr().err
        assert why in err and model in err, err
        assert not out.exists()


def test_kept_embedders_serve_the_next_job_and_end_when_idle(tiny_model, sample_corpus, tmp_path, kept_actors):
    """--keep-embedders: the model actor outlives the job; the next job of the same model and
    settings sends it its pages (same process, no model load, its own counters) and gets the
    same embeddings; the actor ends itself once no call came for the time the last job set."""
    from pipeline.embed.flow import KEPT_EMBEDDER_NAMESPACE

    kept = kept_actors(KEPT_EMBEDDER_NAMESPACE)

    def embeddings(out):
        t, _ = read_dir(os.path.join(out, "pages"))
        t = t.sort_by("page_id")
        return t.column("page_id").to_pylist(), [np.asarray(e, np.float32) for e in t.column("embedding").to_pylist()]

    a = run_job(sample_corpus, str(tmp_path / "a"), tiny_model, "--keep-embedders", "60")
    assert a["keep_embedders"] == 60 and a["embedders_reused"] == 0 and len(kept()) == 1
    # Job b prestarts one worker per CPU free at its start, less the model stage's and one: on
    # this 4-CPU cluster, with the kept actor's CPU held, one, once Ray has released job a's
    # CPUs. On a loaded machine that took longer than job b's start (a README check on
    # 2026-12-05 saw 0 prestarted): wait for it, as a user's next job would find the node.
    import time

    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    b = run_job(sample_corpus, str(tmp_path / "b"), tiny_model, "--keep-embedders", "2")
    assert b["embedders_reused"] == 1 and len(kept()) == 1
    # CPU workers are started ahead (render-ready: Ray Data, the renderer's zygote) only where
    # the model already runs: job b, not job a, whose actor's start they would delay. Which of
    # them then render is Ray's choice (on this small test cluster it trims idle workers within
    # a second): on an H200 node 11 of 15 did (RESULTS "Eighth session").
    assert a["workers_prestarted"] == 0 and b["workers_prestarted"] >= 1
    assert 0 <= b["prestarted_workers_rendered"] <= b["workers_prestarted"]
    actors_a, actors_b = a["this_run"]["actors"], b["this_run"]["actors"]
    assert [x["actor"] for x in actors_b] == [x["actor"] for x in actors_a]  # the same process
    assert actors_a[0]["model_load_s"] > 0 and actors_b[0]["model_load_s"] == 0  # no load in job b
    # job b's counters are its own: its pages, its first batch after its own start
    assert actors_b[0]["pages"] == b["this_run"]["pages"] == a["this_run"]["pages"] == 8
    assert 0 <= actors_b[0]["first_batch_after_s"] <= b["this_run"]["seconds"]
    ids_a, emb_a = embeddings(str(tmp_path / "a"))
    ids_b, emb_b = embeddings(str(tmp_path / "b"))
    assert ids_a == ids_b and all(np.abs(x - y).max() < 1e-3 for x, y in zip(emb_a, emb_b))
    assert kept.wait_gone() == []  # 2 s without a call


def test_a_front_starts_its_kept_actor_again_when_it_is_gone(tiny_model, page_rows, kept_actors, ray_session):
    """A kept actor that ended for good (its idle time ran out just as a call came, or Ray ran
    out of restarts): the front starts one under the same name and the batch is embedded."""
    from pipeline.embed import flow

    kept = kept_actors(flow.KEPT_EMBEDDER_NAMESPACE)
    kwargs = {"model": tiny_model, "device": "cpu", "batches_in_flight": 2}
    gone = flow.spawn_kept_embedder("vdr-embedder-test-0", kwargs, 0.0, 60.0)
    ray_session.get(gone.ready.remote())
    ray_session.kill(gone)
    front = flow.EmbedFront([gone], flow._Turns.remote(), "job-1", 60.0, respawn=("vdr-embedder-test", kwargs, 0.0))
    out = front(page_rows(1, int(TOKENS)))
    assert out.num_rows == 1 and out.column("n_vectors").to_pylist()[0] > 0
    assert [a["name"] for a in kept()] == ["vdr-embedder-test-0"]  # the new one, under the same name


def test_keep_embedders_option():
    from pipeline.config import embed_config

    parsed = vars(embed_corpus.build_parser().parse_args(["--input", "in", "--output", "out", "--keep-embedders", "600"]))
    options = {k: v for k, v in parsed.items() if k not in ("config", "verbose", "debug")}
    assert embed_config(options).keep_embedders == 600
    for bad in (-1, float("nan"), float("inf")):  # nan or inf: a GPU held for ever
        with pytest.raises(ValueError, match="--keep-embedders must be a number of seconds >= 0"):
            embed_config({**options, "keep_embedders": bad})
    assert "--keep-embedders SECONDS" in embed_corpus.build_parser().format_help()


def test_prestarted_workers_setting(ray_session, monkeypatch):
    """$PIPELINE_PRESTART_WORKERS: a number of workers (0: off); anything else is refused by name."""
    from pipeline.config import EmbedConfig
    from pipeline.embed.flow import prestart_workers

    cfg = EmbedConfig(input="in", output="out")
    monkeypatch.delenv("PIPELINE_PRESTART_WORKERS", raising=False)
    assert prestart_workers(cfg) == []  # by default only where the model already runs
    monkeypatch.setenv("PIPELINE_PRESTART_WORKERS", "0")
    assert prestart_workers(cfg, model_running=True) == []
    monkeypatch.setenv("PIPELINE_PRESTART_WORKERS", "2")
    warmed = ray_session.get(prestart_workers(cfg), timeout=120)
    assert len(warmed) == 2 and all(w.count(":") == 1 for w in warmed)
    monkeypatch.setenv("PIPELINE_PRESTART_WORKERS", "many")
    with pytest.raises(ValueError, match="PIPELINE_PRESTART_WORKERS must be a number of workers"):
        prestart_workers(cfg)


def test_device_cuda_on_an_embedded_ray_without_gpus_is_refused_at_once(tiny_model, sample_corpus, tmp_path):
    """--device cuda on a machine without a GPU, on a Ray the job starts itself: exit 2 in
    seconds, naming the flag (Ray waited for a GPU forever, saying only 'the job may hang
    forever' after 60 s). On a cluster it joins, GPU nodes may still come: there it waits."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": ""}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.embed_corpus", "--input", sample_corpus, "--output",
                           str(tmp_path / "out"), "--model", tiny_model, "--max-visual-tokens", TOKENS,
                           "--device", "cuda", "--ray-address", "local"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 120
    assert "error: --device cuda: this machine has no GPU that Ray can use" in proc.stderr
    assert not (tmp_path / "out" / "pages").exists() or not os.listdir(tmp_path / "out" / "pages")


def test_a_run_that_wrote_no_row_does_not_bind_the_next_to_its_model(ray_session, tiny_model, sample_corpus, tmp_path,
                                                                     capsys):
    """A first run whose model failed to load (a path mistyped as a Hub name, offline) leaves
    config.json with its settings and no pages file. The corrected rerun is not refused as if
    OUT held that model's vectors (it was, exit 2, until the user deleted config.json)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": "models/tiny-colqwen2", "settings": {
        "model": "models/tiny-colqwen2", "max_visual_tokens": TOKENS, "dtype": "float32"}}))
    summary = run_job(sample_corpus, str(out), tiny_model)
    assert summary["this_run"]["pages"] > 0
    assert json.loads((out / "config.json").read_text())["settings"]["model"] != "models/tiny-colqwen2"
    # once rows exist, the recorded model binds: another model is refused
    capsys.readouterr()
    assert embed_corpus.main(["--input", sample_corpus, "--output", str(out), "--model", "vidore/colqwen2-v1.0-hf",
                              "--max-visual-tokens", TOKENS]) == 2
    assert "already holds vectors of --model" in capsys.readouterr().err


def test_an_input_without_a_document_warns_and_starts_no_model_actor(ray_session, ray_cluster, tiny_model, tmp_path,
                                                                    caplog, capsys):
    """A first run on an empty folder, or one of other files: a warning naming the input and
    what the job reads, the final line says so, and no model actor is started (on an
    autoscaling cluster it would add a GPU node). It exited 0 with no word."""
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "notes.txt").write_text("not a document")
    (tmp_path / "empty").mkdir()
    actors_before = _model_actors(ray_cluster["dashboard_url"])
    for name, said in (("empty", "it is empty"), ("txt", "1 other file(s) skipped")):
        caplog.clear()
        summary = run_job(str(tmp_path / name), str(tmp_path / f"out-{name}"), tiny_model)
        assert summary["documents_listed"] == 0 and summary["this_run"]["actors"] == []
        assert f"--input {tmp_path / name} holds no document this job reads ({said})" in caplog.text
        assert "no model actor started" in caplog.text
        assert "(no document under --input" in capsys.readouterr().err
    assert _model_actors(ray_cluster["dashboard_url"]) == actors_before  # no model actor was asked for


def test_an_output_inside_its_input_is_not_listed_as_documents(ray_session, tiny_model, sample_corpus, tmp_path):
    """--output inside --input, with --all-files: the job's own files (config.json, shards,
    summary.json) were listed as documents on the rerun, each an error row, more every run."""
    inp = tmp_path / "in"
    shutil.copytree(sample_corpus, inp)
    out = inp / "emb"
    first = run_job(str(inp), str(out), tiny_model, "--all-files")
    second = run_job(str(inp), str(out), tiny_model, "--all-files")
    assert second["documents_listed"] == first["documents_listed"]
    assert second["documents_processed"] == 0 and second["this_run"]["error_rows_final"] == 0
    # a top-level output folder is not listed at all (its own piece of the listing is dropped)
    assert "inside_output" not in second["documents_skipped"]
    table, _ = read_dir(str(out / "errors"))
    assert table is None or not any(d.startswith("emb/") for d in table.column("doc_id").to_pylist())


def test_a_foreign_file_in_the_output_is_named(ray_session, tiny_model, sample_corpus, tmp_path, capsys):
    """A file in OUT/pages that the job did not write: exit 2, the error names it (pyarrow's
    'Parquet file size is 5 bytes' named none), and a foreign but valid Parquet file is refused,
    not read as rows without a doc_id."""
    from jobs import embed_corpus as job
    from pipeline import cli

    argv = ["--input", sample_corpus, "--max-visual-tokens", TOKENS]
    junk = tmp_path / "junk"
    (junk / "pages").mkdir(parents=True)
    (junk / "pages" / "notes.parquet").write_bytes(b"hello")
    assert cli.guarded(job.main, argv + ["--output", str(junk), "--model", tiny_model]) == 2
    err = capsys.readouterr().err
    assert f"{junk / 'pages' / 'notes.parquet'} is not a readable Parquet file" in err and "move them out" in err
    other = tmp_path / "other"
    (other / "pages").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), other / "pages" / "part-0.parquet")
    assert cli.guarded(job.main, argv + ["--output", str(other), "--model", tiny_model]) == 2
    assert "2 row(s) without a doc_id: a Parquet file there was not written by this job" in capsys.readouterr().err


def test_fa4_on_cpu_actors_is_refused_before_any_work(ray_session, tiny_model, sample_corpus, tmp_path, capsys):
    """--vision-attention fa4 where the job's actors run on CPUs: exit 2 with what to change, and
    nothing written (no model loaded, no page rendered)."""
    out = tmp_path / "out"
    assert embed_corpus.main(["--input", sample_corpus, "--output", str(out), "--model", tiny_model,
                              "--max-visual-tokens", TOKENS, "--vision-attention", "fa4"]) == 2
    err = capsys.readouterr().err
    assert "--vision-attention fa4 runs on GPUs only" in err and "auto or sdpa" in err
    assert not (out / "pages").exists() and not (out / "config.json").exists()
    # the preview says what the run would refuse
    assert embed_corpus.main(["--input", sample_corpus, "--output", str(out), "--model", tiny_model,
                              "--max-visual-tokens", TOKENS, "--vision-attention", "fa4", "--preflight"]) == 2
    assert "--vision-attention fa4 runs on GPUs only" in capsys.readouterr().err
