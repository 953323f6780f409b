"""Reruns after sources changed or were deleted, on a real local Ray, real PDFs (local and
S3): a changed document is embedded again with no stale page left, a deleted one loses its
pages and gets a SourceDeleted row, and a shard rewrite stopped halfway is completed."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import embed_corpus
from pipeline import schema

TOKENS = "64"
# Real PDFs of the shared corpora: 1, 2 and 3 pages.
ONE, TWO, THREE = "pdfium/about_blank.pdf", "pdfium/bookmarks.pdf", "pdfium/annotiter.pdf"
ONE_B = "pdfium/363015187.pdf"


def make_corpus(folder, shared_corpora):
    """keep.pdf (top level), reports/change.pdf, reports/gone.pdf, old/gone2.pdf (a whole
    top-level folder that will disappear)."""
    for rel, src in (("keep.pdf", ONE), ("reports/change.pdf", TWO), ("reports/gone.pdf", ONE_B),
                     ("old/gone2.pdf", ONE)):
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        shutil.copy(os.path.join(shared_corpora, src), os.path.join(folder, rel))
    return str(folder)


def run_job(inp, out, model, *extra):
    argv = ["--input", inp, "--output", out, "--model", model, "--max-visual-tokens", TOKENS, "--batch-size", "4",
            *extra]
    assert embed_corpus.main(argv) == 0
    return json.loads(open(os.path.join(out, "summary.json")).read()) if "://" not in out else None


def read_dir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".parquet") and not f.startswith(".")) \
        if os.path.isdir(path) else []
    return (pa.concat_tables([pq.read_table(os.path.join(path, f)) for f in files], promote_options="default")
            if files else None), files


def rows_by_page(table):
    return {r["page_id"]: r for r in table.to_pylist()}


def test_changed_and_deleted_sources_on_a_local_folder(ray_session, tiny_model, shared_corpora, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", shared_corpora)
    out = str(tmp_path / "out")
    first = run_job(corpus, out, tiny_model)
    assert first["this_run"]["pages"] == 1 + 2 + 1 + 1
    before, _ = read_dir(os.path.join(out, "pages"))
    keep_before = rows_by_page(before)["keep.pdf#1"]
    assert keep_before[schema.SOURCE_SIZE] == os.path.getsize(os.path.join(corpus, "keep.pdf"))
    assert keep_before[schema.SOURCE_MTIME] == os.stat(os.path.join(corpus, "keep.pdf")).st_mtime_ns

    shutil.copy(os.path.join(shared_corpora, THREE), os.path.join(corpus, "reports", "change.pdf"))
    os.remove(os.path.join(corpus, "reports", "gone.pdf"))
    shutil.rmtree(os.path.join(corpus, "old"))
    # --preflight shows what the rerun will do to them (it showed neither, 2026-12-06), and changes nothing
    assert embed_corpus.main(["--input", corpus, "--output", out, "--model", tiny_model, "--max-visual-tokens",
                              "64", "--preflight"]) == 0
    with open(os.path.join(out, "preflight.json")) as f:
        preview = json.load(f)
    assert (preview["documents_changed"], preview["documents_deleted"]) == (1, 2)
    assert sorted(preview["deleted_examples"]) == ["old/gone2.pdf", "reports/gone.pdf"]
    assert rows_by_page(read_dir(os.path.join(out, "pages"))[0]).keys() == rows_by_page(before).keys()
    second = run_job(corpus, out, tiny_model)
    assert second["documents_changed"] == 1 and second["changed_examples"] == ["reports/change.pdf"]
    assert second["documents_deleted"] == 2
    assert sorted(second["deleted_examples"]) == ["old/gone2.pdf", "reports/gone.pdf"]
    assert second["documents_processed"] == 1 and second["this_run"]["pages"] == 3
    # the last line says so (it said "0 error rows" and nothing of the SourceDeleted rows written)
    from types import SimpleNamespace

    from pipeline.embed import flow

    assert "; sources since the last run: 1 changed (embedded again), 2 deleted (SourceDeleted rows)" in \
        flow.final_line(SimpleNamespace(output=out), second)

    pages, _ = read_dir(os.path.join(out, "pages"))
    ids = pages.column("page_id").to_pylist()
    assert len(ids) == len(set(ids))  # a page appears once
    assert sorted(ids) == ["keep.pdf#1", "reports/change.pdf#1", "reports/change.pdf#2", "reports/change.pdf#3"]
    rows = rows_by_page(pages)
    assert rows["keep.pdf#1"]["embedding"] == keep_before["embedding"]  # untouched documents keep their rows
    new_size = os.path.getsize(os.path.join(corpus, "reports", "change.pdf"))
    assert {rows[f"reports/change.pdf#{i}"][schema.SOURCE_SIZE] for i in (1, 2, 3)} == {new_size}
    assert {rows[f"reports/change.pdf#{i}"][schema.DOC_PAGES] for i in (1, 2, 3)} == {3}
    errors, _ = read_dir(os.path.join(out, "errors"))
    deleted = {r["doc_id"]: r for r in errors.to_pylist() if r["error_type"] == schema.SOURCE_DELETED}
    assert sorted(deleted) == ["old/gone2.pdf", "reports/gone.pdf"]
    assert {r["stage"] for r in deleted.values()} == {"list"}
    assert errors.num_rows == 2
    assert second["output_totals"]["pages"] == 4

    # The changed document's pages equal a clean run of its new content.
    clean_corpus = tmp_path / "clean"
    os.makedirs(clean_corpus / "reports")
    shutil.copy(os.path.join(shared_corpora, THREE), clean_corpus / "reports" / "change.pdf")
    clean, _ = read_dir(os.path.join(run_job(str(clean_corpus), str(tmp_path / "clean-out"), tiny_model)["output"],
                                      "pages"))
    for r in clean.to_pylist():
        got = rows[r["page_id"]]
        assert (got["width"], got["height"], got["n_vectors"]) == (r["width"], r["height"], r["n_vectors"])
        assert np.array_equal(np.asarray(got["embedding"]), np.asarray(r["embedding"]))

    # A plain rerun does nothing.
    files = sorted(os.listdir(os.path.join(out, "pages"))) + sorted(os.listdir(os.path.join(out, "errors")))
    third = run_job(corpus, out, tiny_model)
    assert third["documents_changed"] == third["documents_deleted"] == third["documents_processed"] == 0
    assert sorted(os.listdir(os.path.join(out, "pages"))) + sorted(os.listdir(os.path.join(out, "errors"))) == files

    # A deleted file that comes back is embedded again; its SourceDeleted row goes.
    shutil.copy(os.path.join(shared_corpora, ONE_B), os.path.join(corpus, "reports", "gone.pdf"))
    fourth = run_job(corpus, out, tiny_model)
    assert fourth["documents_processed"] == 1 and fourth["this_run"]["pages"] == 1
    assert fourth["documents_changed"] == 1 and fourth["documents_deleted"] == 0
    pages, _ = read_dir(os.path.join(out, "pages"))
    assert "reports/gone.pdf#1" in pages.column("page_id").to_pylist()
    errors, _ = read_dir(os.path.join(out, "errors"))
    assert errors.column("doc_id").to_pylist() == ["old/gone2.pdf"]

    # --retry-errors keeps the SourceDeleted row, the only record of that deletion (it was removed
    # with the retriable rows, and the deletion was forgotten)
    fifth = run_job(corpus, out, tiny_model, "--retry-errors")
    assert fifth["documents_processed"] == 0 and fifth["documents_deleted"] == 0
    errors, _ = read_dir(os.path.join(out, "errors"))
    assert errors.column("doc_id").to_pylist() == ["old/gone2.pdf"]
    assert errors.column("error_type").to_pylist() == [schema.SOURCE_DELETED]


def test_changed_and_deleted_sources_on_s3(ray_session, tiny_model, shared_corpora, s3, tmp_path):
    import pyarrow.dataset as pads

    from pipeline.storage import open_filesystem

    bucket = s3.make_bucket()
    s3.upload_folder(make_corpus(tmp_path / "corpus", shared_corpora), bucket, "docs/")
    out = f"s3://{bucket}/emb"
    args = ("--endpoint-url", s3.endpoint_url)
    run_job(f"s3://{bucket}/docs/", out, tiny_model, *args)
    client = s3.client()
    client.upload_file(os.path.join(shared_corpora, THREE), bucket, "docs/reports/change.pdf")
    client.delete_object(Bucket=bucket, Key="docs/reports/gone.pdf")
    client.delete_object(Bucket=bucket, Key="docs/old/gone2.pdf")

    def summary():
        return json.loads(client.get_object(Bucket=bucket, Key="emb/summary.json")["Body"].read())

    def table(folder):
        fs, path = open_filesystem(f"{out}/{folder}")
        return pads.dataset(path, filesystem=fs, format="parquet").to_table()

    run_job(f"s3://{bucket}/docs/", out, tiny_model, *args)
    second = summary()
    assert (second["documents_changed"], second["documents_deleted"], second["documents_processed"]) == (1, 2, 1)
    ids = table("pages").column("page_id").to_pylist()
    assert sorted(ids) == ["keep.pdf#1", "reports/change.pdf#1", "reports/change.pdf#2", "reports/change.pdf#3"]
    errors = table("errors")
    assert sorted(zip(errors.column("doc_id").to_pylist(), errors.column("error_type").to_pylist())) == [
        ("old/gone2.pdf", "SourceDeleted"), ("reports/gone.pdf", "SourceDeleted")]
    def data_keys():  # every run adds its own copy of the summary under emb/summaries/
        return [k for k in s3.keys(bucket, "emb/") if not k.startswith("emb/summaries/")]

    keys = data_keys()
    run_job(f"s3://{bucket}/docs/", out, tiny_model, *args)
    third = summary()
    assert (third["documents_changed"], third["documents_deleted"], third["documents_processed"]) == (0, 0, 0)
    assert data_keys() == keys
    assert not any(k.endswith(schema.RETIRE_JOURNAL) for k in keys)


def test_a_shard_rewrite_killed_halfway_is_completed_by_the_next_run(ray_session, tiny_model, shared_corpora,
                                                                     tmp_path):
    from pipeline.config import EmbedConfig
    from pipeline.embed import plan
    from pipeline.embed.flow import output_metadata

    corpus = make_corpus(tmp_path / "corpus", shared_corpora)
    out = str(tmp_path / "out")
    run_job(corpus, out, tiny_model)
    shutil.copy(os.path.join(shared_corpora, THREE), os.path.join(corpus, "reports", "change.pdf"))
    os.remove(os.path.join(corpus, "reports", "gone.pdf"))

    # The run-start reconciliation, stopped where a kill between "write the new shard" and
    # "delete the old one" would stop it.
    cfg = EmbedConfig(input=corpus, output=out, model=tiny_model, max_visual_tokens=int(TOKENS))
    docs = pa.concat_tables([plan.list_unit(cfg, u)[0] for u in ("", "old", "reports")])

    class Killed(Exception):
        pass

    def kill():
        raise Killed

    with pytest.raises(Killed):
        plan.reconcile(cfg, docs, plan.load_progress(out), output_metadata(cfg, "cpu"), after_write=kill)
    assert os.path.exists(os.path.join(out, schema.RETIRE_JOURNAL))
    pages, files = read_dir(os.path.join(out, "pages"))
    ids = pages.column("page_id").to_pylist()
    assert len(files) == 2 and ids.count("keep.pdf#1") == 2  # the state such a kill leaves: duplicates

    summary = run_job(corpus, out, tiny_model)
    pages, _ = read_dir(os.path.join(out, "pages"))
    ids = pages.column("page_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert sorted(ids) == ["keep.pdf#1", "old/gone2.pdf#1", "reports/change.pdf#1", "reports/change.pdf#2",
                           "reports/change.pdf#3"]
    assert summary["documents_processed"] == 1 and summary["this_run"]["pages"] == 3
    assert not os.path.exists(os.path.join(out, schema.RETIRE_JOURNAL))
    errors, _ = read_dir(os.path.join(out, "errors"))
    assert errors.column("doc_id").to_pylist() == ["reports/gone.pdf"]  # recorded once, before the kill


def test_rows_without_a_recorded_version_count_as_unchanged(ray_session, tiny_model, shared_corpora, tmp_path,
                                                             caplog):
    """Outputs of older versions have no version columns: a rerun neither re-embeds them
    nor fails, and says so; deleted sources are still found."""
    corpus = make_corpus(tmp_path / "corpus", shared_corpora)
    out = str(tmp_path / "out")
    run_job(corpus, out, tiny_model)
    for folder in ("pages", "errors"):
        for name in read_dir(os.path.join(out, folder))[1]:
            path = os.path.join(out, folder, name)
            t = pq.read_table(path)
            pq.write_table(t.drop_columns([schema.SOURCE_SIZE, schema.SOURCE_MTIME]), path)
    shutil.copy(os.path.join(shared_corpora, THREE), os.path.join(corpus, "reports", "change.pdf"))
    os.remove(os.path.join(corpus, "reports", "gone.pdf"))
    with caplog.at_level("INFO"):
        summary = run_job(corpus, out, tiny_model)
    assert summary["documents_changed"] == 0 and summary["documents_processed"] == 0
    assert summary["documents_deleted"] == 1
    assert "without a recorded source version" in caplog.text
    pages, _ = read_dir(os.path.join(out, "pages"))
    assert sorted(pages.column("page_id").to_pylist()) == ["keep.pdf#1", "old/gone2.pdf#1", "reports/change.pdf#1",
                                                           "reports/change.pdf#2"]
