"""What a run has to do: the input listing against what ``OUT`` already holds.

Layout (DESIGN.md): ``OUT/pages/*.parquet``, ``OUT/errors/*.parquet``, ``OUT/summary.json``.
Files are named by a hash of the page keys they hold and written whole or not at all
(:func:`pipeline.embed.stages.write_shard`). A rerun reads only the id columns of what
exists and renders again only documents that are missing or cut short, skipping their
done pages, so it never writes a row twice.
"""

from __future__ import annotations

import collections
import os
import logging

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline import storage
from pipeline.config import EmbedConfig
from pipeline.storage import DOCUMENT_EXTENSIONS, join_uri, list_documents_table

log = logging.getLogger(__name__)

PROGRESS_SCHEMA = pa.schema([
    pa.field(schema.DOC_ID, pa.string()),
    pa.field("done_pages", pa.list_(pa.int32())),  # sorted, unique
    pa.field("n_done", pa.int64()),
    pa.field("n_pages", pa.int32()),
    pa.field("finished", pa.bool_()),  # a document-level error, or a terminal page error
])


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    if name in table.column_names:
        return table.column(name).cast(type_)
    return pa.nulls(table.num_rows, type_)


def load_progress(output_uri: str, endpoint_url: str | None = None) -> pa.Table:
    """What earlier runs wrote, one row per doc_id (id columns only, all in Arrow):
    doc_id, done_pages (sorted list<int32>), n_done, n_pages (null when unknown), finished."""
    pages = storage.read_columns(join_uri(output_uri, schema.PAGES_DIR),
                                 [schema.DOC_ID, schema.PAGE_NUMBER, schema.DOC_PAGES], endpoint_url)
    errors = storage.read_columns(join_uri(output_uri, schema.ERRORS_DIR),
                                  [schema.DOC_ID, schema.PAGE_NUMBER, schema.ERROR_TYPE, schema.DOC_PAGES], endpoint_url)
    if errors is not None and errors.num_rows:
        # A retryable row (storage did not answer) is not progress: the document is redone.
        errors = errors.filter(pc.invert(_retryable(errors)))
    done_parts, size_parts, finished_ids = [], [], []
    for table in (pages, errors):
        if table is None or table.num_rows == 0:
            continue
        ids = _column(table, schema.DOC_ID, pa.string())
        page = _column(table, schema.PAGE_NUMBER, pa.int32())
        size_parts.append(pa.table({schema.DOC_ID: ids, "n_pages": _column(table, schema.DOC_PAGES, pa.int32())}))
        if table is pages:
            done_parts.append(pa.table({schema.DOC_ID: ids, "page": page}))
            continue
        etype = _column(table, schema.ERROR_TYPE, pa.string())
        terminal = pc.or_kleene(pc.is_null(page),
                                pc.fill_null(pc.is_in(etype, value_set=pa.array(sorted(schema.TERMINAL_PAGE_ERRORS),
                                                                                  pa.string())), False))
        both = pa.table({schema.DOC_ID: ids, "page": page})
        finished_ids.append(pc.unique(pc.filter(ids, terminal)))
        done_parts.append(both.filter(pc.invert(terminal)))  # a page error that is not terminal counts as done
    if not size_parts:
        return PROGRESS_SCHEMA.empty_table()
    # Unique (doc, page) pairs, sorted, then one sorted list per document.
    done = pa.concat_tables(done_parts).group_by([schema.DOC_ID, "page"]).aggregate([])
    done = done.sort_by([(schema.DOC_ID, "ascending"), ("page", "ascending")])
    done = done.group_by(schema.DOC_ID, use_threads=False).aggregate([("page", "list"), ("page", "count")])
    sizes = pa.concat_tables(size_parts).group_by(schema.DOC_ID).aggregate([("n_pages", "max")])
    docs = pc.unique(pa.concat_arrays([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
                                       for c in [done[schema.DOC_ID], sizes[schema.DOC_ID], *finished_ids]]))
    i_done = pc.index_in(docs, value_set=done[schema.DOC_ID])
    i_size = pc.index_in(docs, value_set=sizes[schema.DOC_ID])
    finished = (pc.is_in(docs, value_set=pa.concat_arrays(finished_ids)) if finished_ids
                else pa.array([False] * len(docs), pa.bool_()))
    return pa.table({
        schema.DOC_ID: docs,
        "done_pages": done["page_list"].take(i_done),
        "n_done": done["page_count"].take(i_done),
        "n_pages": sizes["n_pages_max"].take(i_size),
        "finished": finished,
    }, schema=PROGRESS_SCHEMA)


def _retryable(errors: pa.Table) -> pa.Array:
    etype = _column(errors, schema.ERROR_TYPE, pa.string())
    return pc.fill_null(pc.is_in(etype, value_set=pa.array(sorted(schema.RETRYABLE_ERRORS), pa.string())), False)


def drop_retryable_rows(output_uri: str, endpoint_url: str | None = None) -> int:
    """Rewrite each OUT/errors file that holds retryable rows (``StorageUnavailable``) without
    them, so that the documents they name are redone and leave no stale row. Call it while
    holding the output lock, before planning. Returns how many rows were dropped.

    Crash-safe and idempotent: the remaining rows are written first, whole, to a new file
    named by their keys (:func:`schema.shard_name`), and only then is the old file deleted.
    A crash in between leaves the old file, whose final rows the new file repeats (the
    planner counts a document once); the next run writes the same new name again (same
    bytes) and deletes the old file."""
    try:
        fs, files = storage.list_files(join_uri(output_uri, schema.ERRORS_DIR), endpoint_url)
    except FileNotFoundError:
        return 0
    if not files:
        return 0
    types = storage.read_columns(join_uri(output_uri, schema.ERRORS_DIR), [schema.ERROR_TYPE], endpoint_url)
    if types is None or not (pc.sum(_retryable(types)).as_py() or 0):
        return 0  # the common case costs one read of one column
    dropped = 0
    for f in files:
        uri = join_uri(output_uri, schema.ERRORS_DIR, f.base_name)
        table = storage.read_parquet(uri, endpoint_url)
        retry = _retryable(table)
        n = pc.sum(retry).as_py() or 0
        if not n:
            continue
        keep = table.filter(pc.invert(retry))
        if keep.num_rows:
            keys = [f"{d}#{p}" for d, p in zip(keep.column(schema.DOC_ID).to_pylist(),
                                               keep.column(schema.PAGE_NUMBER).to_pylist())]
            name = schema.shard_name(keys)
            storage.write_parquet(join_uri(output_uri, schema.ERRORS_DIR, name), keep, endpoint_url)
        fs.delete_file(f.path)
        dropped += n
    log.info("%d retryable error row(s) (storage did not answer) removed from %s: those documents are tried "
             "again", dropped, join_uri(output_uri, schema.ERRORS_DIR))
    return dropped


def remove_error_files(output_uri: str, endpoint_url: str | None = None) -> int:
    """Delete OUT/errors/*.parquet so a rerun tries those documents again.

    Safe at any moment: a document without rows is simply redone, so a crash halfway
    leaves no duplicates, only work for the next run."""
    return storage.delete_files(join_uri(output_uri, schema.ERRORS_DIR), endpoint_url)


def output_totals(output_uri: str, endpoint_url: str | None = None) -> dict:
    """Counts over everything in OUT (this run and earlier ones)."""
    totals = {"documents_with_pages": 0, "pages": 0, "vectors": 0, "error_rows": 0, "errors_by_type": {}}
    pages = storage.read_columns(join_uri(output_uri, schema.PAGES_DIR), [schema.DOC_ID, schema.N_VECTORS], endpoint_url)
    if pages is not None:
        totals["pages"] = pages.num_rows
        totals["vectors"] = int(pa.compute.sum(pages[schema.N_VECTORS]).as_py() or 0)
        totals["documents_with_pages"] = len(pa.compute.unique(pages[schema.DOC_ID]))
    totals["error_rows_final"] = totals["error_rows_retryable"] = 0
    errors = storage.read_columns(join_uri(output_uri, schema.ERRORS_DIR), [schema.ERROR_TYPE], endpoint_url)
    if errors is not None:
        totals["error_rows"] = errors.num_rows
        totals["errors_by_type"] = dict(collections.Counter(errors[schema.ERROR_TYPE].to_pylist()).most_common())
        totals["error_rows_retryable"] = int(pc.sum(_retryable(errors)).as_py() or 0)
        totals["error_rows_final"] = errors.num_rows - totals["error_rows_retryable"]
    return totals


TODO_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string()),
    pa.field("source_uri", pa.string()),
    pa.field("size_bytes", pa.int64()),
    pa.field("skip_pages", pa.list_(pa.int32())),
])


def plan_table(docs: pa.Table, progress: pa.Table) -> tuple[pa.Table, dict]:
    """Listing (doc_id, source_uri, size_bytes) against the done-set (:func:`load_progress`)
    -> the documents to (re)do, in listing order, with ``skip_pages``: the pages an earlier
    run already wrote. Complete documents are dropped."""
    listed = docs.num_rows
    idx = pc.index_in(docs["doc_id"], value_set=progress[schema.DOC_ID].combine_chunks())
    n_done = pc.fill_null(progress["n_done"].take(idx), 0)
    n_pages = progress["n_pages"].take(idx)
    finished = pc.fill_null(progress["finished"].take(idx), False)
    complete = pc.or_(finished, pc.fill_null(pc.greater_equal(n_done, pc.cast(n_pages, pa.int64())), False))
    keep = pc.invert(complete)
    skip = pc.filter(progress["done_pages"].take(idx), keep)
    skip = pc.if_else(pc.is_null(skip), pa.scalar([], pa.list_(pa.int32())), skip)
    todo = pa.table({
        "doc_id": pc.filter(docs["doc_id"], keep),
        "source_uri": pc.filter(docs["source_uri"], keep),
        "size_bytes": pc.filter(docs["size_bytes"], keep),
        "skip_pages": skip,
    }, schema=TODO_SCHEMA)
    resumed = pc.sum(pc.greater(pc.filter(n_done, keep), 0)).as_py() or 0
    already = pc.sum(complete).as_py() or 0
    return todo, {"documents_listed": listed, "documents_already_done": int(already),
                  "documents_resumed": int(resumed)}


def plan_unit(cfg: EmbedConfig, unit: str, progress: pa.Table) -> tuple[pa.Table, dict]:
    """One piece of the listing (:func:`pipeline.storage.listing_units`) against the
    done-set: the documents of that piece to (re)do, and its counts. The flow runs one task
    per piece, so the first pages reach the model while other pieces are still listed."""
    skipped: dict = {}
    storage.configure(cfg.storage_timeout_s, cfg.storage_attempts)
    docs = list_documents_table(cfg.input, cfg.endpoint_url, None if cfg.all_files else DOCUMENT_EXTENSIONS,
                                under=unit, skipped=skipped)
    todo, stats = plan_table(docs, progress)
    return todo, {**stats, "documents_skipped": skipped}


def plan_documents(cfg: EmbedConfig) -> tuple[pa.Table, dict]:
    """Documents to (re)do as an Arrow table (doc_id, source_uri, size_bytes, skip_pages),
    sorted by doc_id, with the pages of each that an earlier run already wrote."""
    docs = list_documents_table(cfg.input, cfg.endpoint_url, None if cfg.all_files else DOCUMENT_EXTENSIONS)
    progress = load_progress(cfg.output, cfg.endpoint_url)
    return plan_table(docs, progress)


def looks_local(name: str) -> bool:
    """A model given as a local path (absolute, ./ or ../, or an existing folder), not a hub id."""
    return name.startswith(("/", "./", "../", "~", "file://")) or os.path.exists(name)


def check_model(name: str, endpoint_url: str | None = None) -> str:
    """Fail in seconds, before any rendering, on a ``--model`` that cannot load: a local folder
    or an object-store prefix must hold a ColQwen2 ``config.json`` and weights. Hub names are
    left to the actors (they may be cached on the nodes, or downloaded there). Returns what
    was checked, for the log."""
    if not ("://" in name or looks_local(name)):
        return f"{name} (a Hugging Face Hub name: each node loads it from its cache or the Hub)"
    folder = name.removeprefix("file://")
    try:
        config = storage.read_json(join_uri(folder, "config.json"), endpoint_url)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(
            f"--model {name}: no config.json there. Pass a ColQwen2 checkpoint folder (local, s3:// or "
            "gs://; `python -m jobs.build_tiny_model` writes a tiny one) or a hub name such as "
            "vidore/colqwen2-v1.0-hf") from None
    except ValueError as exc:
        raise ValueError(f"--model {name}: config.json is not valid JSON ({exc})") from None
    if config.get("model_type") != "colqwen2":
        raise ValueError(f"--model {name} is not a ColQwen2 checkpoint: its config.json says model_type="
                         f"{config.get('model_type')!r} (expected 'colqwen2', as vidore/colqwen2-v1.0-hf)")
    try:
        _, files = storage.list_files(folder, endpoint_url, suffix="", recursive=True)
    except FileNotFoundError:
        files = []
    if not any(f.base_name.endswith((".safetensors", ".bin")) for f in files):
        raise FileNotFoundError(f"--model {name}: config.json but no weights (*.safetensors) in that folder")
    return f"{name} (ColQwen2 checkpoint, {len(files)} files)"
