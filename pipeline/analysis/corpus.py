"""An embedding output at a glance: documents, pages and vectors, error rows with what to do
about each type, storage per page, and the runs' summaries over time."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema

# What an error type means and what to do about it (the error types of README.md).
ERROR_ADVICE = {
    "EncryptedDocument": "password-protected PDF: get an unencrypted copy, or drop it",
    "CorruptDocument": "pdfium could not open it (truncated or damaged): fetch the file again from its source",
    "EmptyFile": "0 bytes: the upload or copy failed; copy it again",
    "EmptyDocument": "a PDF without pages: nothing to embed; drop it",
    "UnknownFormat": "neither a PDF nor an image (check the extension and the first bytes); convert or drop it",
    "UnreadableImage": "the image decoder failed: re-export the image (PNG or JPEG)",
    "OversizedImage": "over the pixel cap: downscale it, or raise --max-image-pixels",
    "OversizedFile": "over the size cap: split the document, or raise the cap",
    "RenderTimeout": "rendering took longer than --render-timeout-s: raise it, or rasterise the file elsewhere",
    "RendererCrashed": "pdfium crashed on it (often a hostile or broken file): repair it (qpdf) or drop it",
    "TooManyPages": "pages beyond --max-pages-per-doc: raise the limit to embed them",
    "StorageUnavailable": "object storage did not answer: rerun the same command, these are retried",
    "SourceDeleted": "the source file was deleted: nothing to do (it is embedded again if it comes back)",
    "EmptyPage": "a page with no area: nothing to embed",
    "DegeneratePage": "aspect ratio over 200: the model rejects it; crop the page",
}


def advice(error_type: str) -> str:
    return ERROR_ADVICE.get(error_type, "unexpected: read the message; rerun with --debug, and report it if it repeats")


def documents(pages: pa.Table) -> pa.Table:
    """One row per document: ``doc_id``, ``pages``, ``vectors``, sorted by doc_id."""
    t = pages.select([schema.DOC_ID, schema.N_VECTORS]).group_by(schema.DOC_ID).aggregate(
        [(schema.N_VECTORS, "count"), (schema.N_VECTORS, "sum")])
    t = t.rename_columns([schema.DOC_ID if n == schema.DOC_ID else ("pages" if n.endswith("count") else "vectors")
                          for n in t.column_names])
    return t.select([schema.DOC_ID, "pages", "vectors"]).sort_by(schema.DOC_ID)


def overview(pages: pa.Table, errors: pa.Table) -> dict:
    """Counts: documents with pages, documents with errors, pages, vectors, error rows."""
    return {
        "documents_with_pages": pc.count_distinct(pages.column(schema.DOC_ID)).as_py(),
        "pages": pages.num_rows,
        "vectors": int(pc.sum(pages.column(schema.N_VECTORS)).as_py() or 0),
        "documents_with_errors": pc.count_distinct(errors.column(schema.DOC_ID)).as_py() if errors.num_rows else 0,
        "error_rows": errors.num_rows,
    }


def error_summary(errors: pa.Table, examples: int = 3) -> pa.Table:
    """One row per error type, most frequent first: ``error_type``, ``rows``, ``stages``,
    ``examples`` (doc ids), ``message`` (the first one) and ``what_to_do``."""
    rows = {}
    for r in errors.select([schema.ERROR_TYPE, schema.STAGE, schema.DOC_ID, schema.MESSAGE]).to_pylist():
        e = rows.setdefault(r[schema.ERROR_TYPE], {"rows": 0, "stages": set(), "examples": [], "message": r[schema.MESSAGE]})
        e["rows"] += 1
        e["stages"].add(r[schema.STAGE])
        if len(e["examples"]) < examples:
            e["examples"].append(r[schema.DOC_ID])
    out = [{"error_type": t, "rows": e["rows"], "stages": ",".join(sorted(e["stages"])),
            "examples": ", ".join(e["examples"]), "message": e["message"][:160], "what_to_do": advice(t)}
           for t, e in sorted(rows.items(), key=lambda kv: (-kv[1]["rows"], kv[0]))]
    return pa.Table.from_pylist(out, schema=pa.schema([(n, pa.int64() if n == "rows" else pa.string()) for n in
                                                       ("error_type", "rows", "stages", "examples", "message",
                                                        "what_to_do")]))


def storage_per_page(file_stats: pa.Table, vectors: int) -> dict:
    """Bytes on storage per page and per vector, and the embedding column's share, from
    :func:`pipeline.analysis.inputs.file_stats`. float16 vectors of 128 values are 256 bytes raw."""
    pages = int(pc.sum(file_stats.column("rows")).as_py() or 0)
    total = int(pc.sum(file_stats.column("file_bytes")).as_py() or 0)
    emb = int(pc.sum(file_stats.column("embedding_bytes")).as_py() or 0)
    return {
        "files": file_stats.num_rows,
        "pages": pages,
        "bytes": total,
        "bytes_per_page": total / pages if pages else None,
        "embedding_bytes_per_vector": emb / vectors if vectors else None,
        "raw_bytes_per_vector": 2 * schema.EMBEDDING_DIM,
        "embedding_share": emb / total if total else None,
    }


SUMMARY_COLUMNS = ("started_at", "generation", "max_visual_tokens", "pool_factor", "device", "documents_processed",
                   "pages", "vectors", "error_rows", "seconds", "pages_per_second")


def summaries_table(summaries: list[dict]) -> pa.Table:
    """The embedding runs' summaries (:func:`pipeline.analysis.inputs.read_summaries`) as
    one row per run, oldest first."""
    rows = []
    for s in summaries:
        run = s.get("this_run", {})
        rows.append({
            "started_at": s.get("started_at"), "generation": s.get("generation"),
            "max_visual_tokens": s.get("max_visual_tokens"), "pool_factor": s.get("pool_factor"),
            "device": s.get("device"), "documents_processed": s.get("documents_processed"),
            "pages": run.get("pages"), "vectors": run.get("vectors"), "error_rows": run.get("error_rows"),
            "seconds": run.get("seconds"), "pages_per_second": run.get("pages_per_second"),
        })
    types = {"started_at": pa.string(), "device": pa.string(), "seconds": pa.float64(), "pages_per_second": pa.float64()}
    return pa.Table.from_pylist(rows, schema=pa.schema([(c, types.get(c, pa.int64())) for c in SUMMARY_COLUMNS]))
