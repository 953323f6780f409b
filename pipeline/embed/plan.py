"""What a run has to do: the input listing against what ``OUT`` already holds.

Layout (DESIGN.md): ``OUT/pages/*.parquet``, ``OUT/errors/*.parquet``, ``OUT/summary.json``.
Files are named by a hash of the page keys they hold and written whole or not at all
(:func:`pipeline.embed.stages.write_shard`). A rerun reads only the id columns of what
exists and renders again only documents that are missing or cut short, skipping their
done pages, so it never writes a row twice.

Source versions: every row records the size and modification time its source had when it
was listed (``source_size_bytes``, ``source_mtime_ns``). At run start, under the output lock,
:func:`reconcile` compares them with a full listing: a changed document's rows, and a deleted
document's page rows, are retired by rewriting the shards that hold them (new file first,
then the old one deleted, with a journal that the next run completes: :func:`finish_retirement`),
deleted documents get a ``SourceDeleted`` error row, and changed ones are embedded again.
Rows without a recorded version (outputs of older versions) count as unchanged.

Generations (:func:`select_generation`): a run whose model, token budget, dtype, prompts or
pool factor differ from what the output holds is refused, unless ``--force-new-config`` starts the next
generation (``OUT/generations/<n>/``) that readers and reruns then use instead.
"""

from __future__ import annotations

import collections
import datetime
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
    # The source versions its rows record (min and max over its rows; null: none recorded).
    pa.field("size_min", pa.int64()),
    pa.field("size_max", pa.int64()),
    pa.field("mtime_min", pa.int64()),
    pa.field("mtime_max", pa.int64()),
    pa.field("deleted", pa.bool_()),  # has a SourceDeleted error row
    pa.field("live", pa.bool_()),  # has rows other than SourceDeleted
])


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    if name in table.column_names:
        return table.column(name).cast(type_)
    return pa.nulls(table.num_rows, type_)


def load_progress(output_uri: str, endpoint_url: str | None = None) -> pa.Table:
    """What earlier runs wrote, one row per doc_id (id columns only, all in Arrow):
    doc_id, done_pages (sorted list<int32>), n_done, n_pages (null when unknown), finished,
    and the recorded source versions (size_min/max, mtime_min/max), deleted (a SourceDeleted
    row: not finished, the document is redone if listed again) and live (other rows)."""
    version_columns = [schema.SOURCE_SIZE, schema.SOURCE_MTIME]
    pages = storage.read_columns(join_uri(output_uri, schema.PAGES_DIR),
                                 [schema.DOC_ID, schema.PAGE_NUMBER, schema.DOC_PAGES, *version_columns], endpoint_url,
                                 types=schema.PAGES_FILE_SCHEMA)
    errors = storage.read_columns(join_uri(output_uri, schema.ERRORS_DIR),
                                  [schema.DOC_ID, schema.PAGE_NUMBER, schema.ERROR_TYPE, schema.DOC_PAGES,
                                   *version_columns], endpoint_url, types=schema.ERRORS_FILE_SCHEMA)
    for folder, table in ((schema.PAGES_DIR, pages), (schema.ERRORS_DIR, errors)):
        if table is not None and table.column(schema.DOC_ID).null_count:
            raise storage.ForeignFileError(
                f"{join_uri(output_uri, folder)}: {table.column(schema.DOC_ID).null_count} row(s) without a doc_id: "
                "a Parquet file there was not written by this job; move it out, or use another --output")
    if errors is not None and errors.num_rows:
        # A retryable row (storage did not answer) is not progress: the document is redone.
        errors = errors.filter(pc.invert(_retryable(errors)))
    done_parts, size_parts, finished_ids, version_parts = [], [], [], []
    for table in (pages, errors):
        if table is None or table.num_rows == 0:
            continue
        ids = _column(table, schema.DOC_ID, pa.string())
        page = _column(table, schema.PAGE_NUMBER, pa.int32())
        size_parts.append(pa.table({schema.DOC_ID: ids, "n_pages": _column(table, schema.DOC_PAGES, pa.int32())}))
        marker = (pc.fill_null(pc.equal(_column(table, schema.ERROR_TYPE, pa.string()), schema.SOURCE_DELETED), False)
                  if table is errors else pa.array([False] * table.num_rows, pa.bool_()))
        live = pc.invert(marker)
        version_parts.append(pa.table({
            schema.DOC_ID: ids, "marker": marker, "live": live,
            "size": pc.if_else(live, _column(table, schema.SOURCE_SIZE, pa.int64()), pa.scalar(None, pa.int64())),
            "mtime": pc.if_else(live, _column(table, schema.SOURCE_MTIME, pa.int64()), pa.scalar(None, pa.int64())),
        }))
        if table is pages:
            done_parts.append(pa.table({schema.DOC_ID: ids, "page": page}))
            continue
        etype = _column(table, schema.ERROR_TYPE, pa.string())
        terminal = pc.or_kleene(pc.is_null(page),
                                pc.fill_null(pc.is_in(etype, value_set=pa.array(sorted(schema.TERMINAL_PAGE_ERRORS),
                                                                                  pa.string())), False))
        terminal = pc.and_(terminal, live)  # a SourceDeleted row finishes nothing
        both = pa.table({schema.DOC_ID: ids, "page": page})
        finished_ids.append(pc.unique(pc.filter(ids, terminal)))
        done_parts.append(both.filter(pc.and_(pc.invert(terminal), live)))  # a page error that is not terminal counts as done
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
    versions = pa.concat_tables(version_parts).group_by(schema.DOC_ID).aggregate(
        [("size", "min"), ("size", "max"), ("mtime", "min"), ("mtime", "max"), ("marker", "any"), ("live", "any")])
    i_ver = pc.index_in(docs, value_set=versions[schema.DOC_ID])
    return pa.table({
        schema.DOC_ID: docs,
        "done_pages": done["page_list"].take(i_done),
        "n_done": done["page_count"].take(i_done),
        "n_pages": sizes["n_pages_max"].take(i_size),
        "finished": finished,
        "size_min": versions["size_min"].take(i_ver),
        "size_max": versions["size_max"].take(i_ver),
        "mtime_min": versions["mtime_min"].take(i_ver),
        "mtime_max": versions["mtime_max"].take(i_ver),
        "deleted": versions["marker_any"].take(i_ver),
        "live": versions["live_any"].take(i_ver),
    }, schema=PROGRESS_SCHEMA)


def _retryable(errors: pa.Table) -> pa.Array:
    etype = _column(errors, schema.ERROR_TYPE, pa.string())
    return pc.fill_null(pc.is_in(etype, value_set=pa.array(sorted(schema.RETRYABLE_ERRORS), pa.string())), False)


def drop_retryable_rows(output_uri: str, endpoint_url: str | None = None) -> int:
    """Rewrite each OUT/errors file that holds retryable rows (``StorageUnavailable``) without
    them, so that the documents they name are redone and leave no stale row. Call it while
    holding the output lock, before planning. Returns how many rows were dropped."""
    dropped = _drop_error_rows(output_uri, endpoint_url, _retryable)
    if dropped:
        log.info("%d retryable error row(s) (storage did not answer) removed from %s: those documents are tried "
                 "again", dropped, join_uri(output_uri, schema.ERRORS_DIR))
    return dropped


def remove_error_rows(output_uri: str, endpoint_url: str | None = None) -> int:
    """``--retry-errors``: drop every error row but the ``SourceDeleted`` ones, so a rerun tries
    those documents again. A deleted source's row stays: it cannot be retried, and it is the
    only record of the deletion (until 2026-12-06 it was removed with the others). Returns
    how many rows were dropped.

    Safe at any moment: a document without rows is simply redone, so a crash halfway
    leaves no duplicates, only work for the next run."""
    def retriable(table: pa.Table) -> pa.Array:
        return pc.invert(pc.fill_null(pc.equal(table.column(schema.ERROR_TYPE), schema.SOURCE_DELETED), False))

    return _drop_error_rows(output_uri, endpoint_url, retriable)


def _drop_error_rows(output_uri: str, endpoint_url: str | None, which) -> int:
    """Rewrite each OUT/errors file without the rows ``which(table)`` marks (a whole file when
    it keeps none). Crash-safe and idempotent: the remaining rows are written first, whole, to
    a new file named by their keys (:func:`schema.shard_name`), and only then is the old file
    deleted. A crash in between leaves the old file, whose kept rows the new file repeats (the
    planner counts a document once); the next run writes the same new name again (same bytes)
    and deletes the old file."""
    try:
        fs, files = storage.list_files(join_uri(output_uri, schema.ERRORS_DIR), endpoint_url)
    except FileNotFoundError:
        return 0
    if not files:
        return 0
    types = storage.read_columns(join_uri(output_uri, schema.ERRORS_DIR), [schema.ERROR_TYPE], endpoint_url)
    if types is None or not (pc.sum(which(types)).as_py() or 0):
        return 0  # the common case costs one read of one column
    dropped = 0
    for f in files:
        uri = join_uri(output_uri, schema.ERRORS_DIR, f.base_name)
        table = storage.read_parquet(uri, endpoint_url)
        drop = which(table)
        n = pc.sum(drop).as_py() or 0
        if not n:
            continue
        keep = table.filter(pc.invert(drop))
        if keep.num_rows:
            keys = [f"{d}#{p}" for d, p in zip(keep.column(schema.DOC_ID).to_pylist(),
                                               keep.column(schema.PAGE_NUMBER).to_pylist())]
            name = schema.shard_name(keys)
            storage.write_parquet(join_uri(output_uri, schema.ERRORS_DIR, name), keep, endpoint_url)
        fs.delete_file(f.path)
        dropped += n
    return dropped


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
    pa.field("mtime_ns", pa.int64()),
])


def _source_changed(docs: pa.Table, progress: pa.Table, idx) -> pa.ChunkedArray | pa.Array:
    """Per listed document: its rows record another source version than the listing's (or
    its source was recorded as deleted). No recorded version (older outputs): unchanged.
    An unknown listed mtime compares the size only."""
    size = _column(docs, "size_bytes", pa.int64())
    mtime = _column(docs, "mtime_ns", pa.int64())
    differs = pc.fill_null(progress["deleted"].take(idx), False)
    for col, listed in (("size_min", size), ("size_max", size), ("mtime_min", mtime), ("mtime_max", mtime)):
        differs = pc.or_(differs, pc.fill_null(pc.not_equal(progress[col].take(idx), listed), False))
    return differs


def plan_table(docs: pa.Table, progress: pa.Table) -> tuple[pa.Table, dict]:
    """Listing (doc_id, source_uri, size_bytes, mtime_ns) against the done-set
    (:func:`load_progress`) -> the documents to (re)do, in listing order, with ``skip_pages``:
    the pages an earlier run already wrote. Complete documents are dropped; a document whose
    source version changed is redone whole (:func:`reconcile` has retired its old rows)."""
    listed = docs.num_rows
    idx = pc.index_in(docs["doc_id"], value_set=progress[schema.DOC_ID].combine_chunks())
    changed = _source_changed(docs, progress, idx)
    n_done = pc.if_else(changed, 0, pc.fill_null(progress["n_done"].take(idx), 0))
    n_pages = progress["n_pages"].take(idx)
    finished = pc.fill_null(progress["finished"].take(idx), False)
    complete = pc.or_(finished, pc.fill_null(pc.greater_equal(n_done, pc.cast(n_pages, pa.int64())), False))
    complete = pc.and_(complete, pc.invert(changed))
    keep = pc.invert(complete)
    skip = pc.filter(progress["done_pages"].take(idx), keep)
    skip = pc.if_else(pc.or_(pc.is_null(skip), pc.filter(changed, keep)), pa.scalar([], pa.list_(pa.int32())), skip)
    todo = pa.table({
        "doc_id": pc.filter(docs["doc_id"], keep),
        "source_uri": pc.filter(docs["source_uri"], keep),
        "size_bytes": pc.filter(docs["size_bytes"], keep),
        "skip_pages": skip,
        "mtime_ns": pc.filter(_column(docs, "mtime_ns", pa.int64()), keep),
    }, schema=TODO_SCHEMA)
    resumed = pc.sum(pc.greater(pc.filter(n_done, keep), 0)).as_py() or 0
    already = pc.sum(complete).as_py() or 0
    return todo, {"documents_listed": listed, "documents_already_done": int(already),
                  "documents_resumed": int(resumed)}


def list_unit(cfg: EmbedConfig, unit: str, exclude: str | None = None) -> tuple[pa.Table, dict]:
    """One piece of the listing (:func:`pipeline.storage.listing_units`): (documents, skipped).
    ``exclude``: the output folder relative to the input (:func:`output_inside_input`)."""
    skipped: dict = {}
    storage.configure(cfg.storage_timeout_s, cfg.storage_attempts)
    docs = list_documents_table(cfg.input, cfg.endpoint_url, None if cfg.all_files else DOCUMENT_EXTENSIONS,
                                under=unit, skipped=skipped, exclude=exclude)
    return docs, skipped


def output_inside_input(input_uri: str, output_uri: str) -> str | None:
    """The output folder (``OUT`` itself: every generation is under it) relative to the input
    when it lies inside it, else None: its files are not the corpus's documents (with
    --all-files its config.json and shards were listed, as error rows, growing each rerun).

    >>> output_inside_input("s3://b/in", "s3://b/in/emb/"), output_inside_input("/d/in/", "/d/in-2")
    ('emb', None)
    >>> output_inside_input("file:///d/in", "/d/in/runs/emb")
    'runs/emb'
    """
    def plain(uri: str) -> str:
        return (uri[len("file://"):] if uri.startswith("file://") else uri).rstrip("/")

    out, inp = plain(output_uri), plain(input_uri)
    return out[len(inp) + 1:] if out.startswith(inp + "/") else None


def plan_unit(cfg: EmbedConfig, unit: str, progress: pa.Table,
              listing: tuple[pa.Table, dict] | None = None, exclude: str | None = None) -> tuple[pa.Table, dict]:
    """One piece of the listing (:func:`pipeline.storage.listing_units`) against the
    done-set: the documents of that piece to (re)do, and its counts. The flow runs one task
    per piece, so the first pages reach the model while other pieces are still listed.
    ``listing``: that piece's :func:`list_unit`, when the run has listed it already."""
    docs, skipped = listing if listing is not None else list_unit(cfg, unit, exclude)
    todo, stats = plan_table(docs, progress)
    return todo, {**stats, "documents_skipped": skipped}


def plan_documents(cfg: EmbedConfig) -> tuple[pa.Table, dict]:
    """Documents to (re)do as an Arrow table (doc_id, source_uri, size_bytes, skip_pages),
    sorted by doc_id, with the pages of each that an earlier run already wrote."""
    docs = list_documents_table(cfg.input, cfg.endpoint_url, None if cfg.all_files else DOCUMENT_EXTENSIONS)
    progress = load_progress(cfg.output, cfg.endpoint_url)
    return plan_table(docs, progress)


def looks_local(name: str) -> bool:
    """A model given as a local path, not a hub id: absolute, ./ or ../, an existing path, or a
    relative path that no hub id can be (a hub id is ``name`` or ``org/name``; more parts are a
    path). ``org/name`` that is not here stays a hub id even where a folder ``org`` exists (a
    ``vidore/`` data folder must not turn the default vidore/colqwen2-v1.0-hf into a path)."""
    if name.startswith(("/", "./", "../", "~", "file://")) or os.path.exists(name):
        return True
    return "://" not in name and len(name.split("/")) > 2


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


# ----------------------------------------------------------------------------- changed and deleted sources

# How many example doc_ids the summary and the log give for changed and deleted documents.
CHANGE_EXAMPLES = 5


def _has_document_extension(ids) -> pa.Array:
    lower = pc.utf8_lower(ids)
    out = pa.array([False] * len(ids), pa.bool_())
    for ext in DOCUMENT_EXTENSIONS:
        out = pc.or_(out, pc.ends_with(lower, pattern=ext))
    return out


def source_changes(docs: pa.Table, progress: pa.Table, all_files: bool = False,
                   look_for_deleted: bool = True) -> dict:
    """The complete listing against what OUT holds: ``changed`` (doc_ids whose recorded source
    version differs, or that were recorded as deleted and are back), ``deleted`` (doc_ids with
    rows in OUT, other than SourceDeleted, that are no longer listed) and ``unversioned`` (how
    many listed documents have rows without a recorded version: treated as unchanged).

    ``docs`` must be the listing of the *whole* input: a document missing from it is taken as
    deleted. Without ``all_files``, rows of files that have no document extension (written by
    an ``--all-files`` run) are not taken as deleted."""
    ids = progress[schema.DOC_ID].combine_chunks()
    idx = pc.index_in(docs["doc_id"], value_set=ids)
    changed = pc.filter(docs["doc_id"], _source_changed(docs, progress, idx))
    matched = pc.is_valid(idx)
    unversioned = pc.and_(pc.and_(matched, pc.is_null(progress["size_max"].take(idx))),
                          pc.invert(pc.fill_null(progress["deleted"].take(idx), False)))
    deleted = pa.array([], pa.string())
    if look_for_deleted and docs.num_rows:
        gone = pc.and_(pc.invert(pc.is_in(ids, value_set=docs["doc_id"].combine_chunks())),
                       pc.fill_null(progress["live"].combine_chunks(), False))
        if not all_files:
            gone = pc.and_(gone, _has_document_extension(ids))
        deleted = pc.filter(ids, gone)
    return {"changed": changed.combine_chunks() if isinstance(changed, pa.ChunkedArray) else changed,
            "deleted": deleted, "unversioned": int(pc.sum(unversioned).as_py() or 0)}


def _retire_mask(table: pa.Table, changed: pa.Array, deleted: pa.Array) -> pa.Array:
    """Rows to retire: every row of a changed document; every row of a deleted one except
    its SourceDeleted row."""
    ids = _column(table, schema.DOC_ID, pa.string())
    marker = pc.fill_null(pc.equal(_column(table, schema.ERROR_TYPE, pa.string()), schema.SOURCE_DELETED), False)
    return pc.or_(pc.is_in(ids, value_set=changed),
                  pc.and_(pc.is_in(ids, value_set=deleted), pc.invert(marker)))


def _row_keys(table: pa.Table) -> list[str]:
    """The keys a shard's name is made of (:func:`pipeline.embed.stages.write_shard`)."""
    return [f"{d}#{p}" for d, p in zip(table.column(schema.DOC_ID).to_pylist(),
                                       table.column(schema.PAGE_NUMBER).to_pylist())]


def finish_retirement(output_uri: str, endpoint_url: str | None = None) -> int:
    """Complete the shard rewrites a run was killed in (``OUT/_retire.json``), under the lock.

    The journal lists ``[old, new]`` file pairs and is written before any new file; a new file
    is written whole before its old one is deleted. So for each pair: the new file exists (or
    there is none: nothing of the old one was kept) -> delete the old one; the new file is
    missing -> the old one is intact and is kept (the next reconciliation retires its rows
    again). Idempotent; returns how many old files it deleted."""
    uri = join_uri(output_uri, schema.RETIRE_JOURNAL)
    try:
        journal = storage.read_json(uri, endpoint_url)
    except FileNotFoundError:
        return 0
    except ValueError:
        journal = {"rewrites": []}  # a torn journal: written atomically, so never; keep the files
    deleted = 0
    for old, new in journal.get("rewrites", []):
        if new is None or storage.exists(join_uri(output_uri, new), endpoint_url):
            deleted += storage.delete_file(join_uri(output_uri, old), endpoint_url)
    storage.delete_file(uri, endpoint_url)
    return deleted


def retire_documents(output_uri: str, changed: pa.Array, deleted: pa.Array, endpoint_url: str | None = None,
                     after_write=None) -> dict:
    """Remove the rows of ``changed`` documents and the page and error rows of ``deleted``
    ones (not their SourceDeleted row) from OUT: each shard that holds some is rewritten
    without them under its new content name, then deleted. Crash-safe: the journal
    (:func:`finish_retirement`) is written first, each new file is written whole before any
    old file is deleted, so a kill at any point leaves every kept row in at least one file, and
    the next run removes the duplicates. ``after_write`` is called between the writes and the
    deletions (tests use it to stop there)."""
    from pipeline.embed.stages import shard_name

    id_columns = {schema.PAGES_DIR: [schema.DOC_ID, schema.PAGE_NUMBER],
                  schema.ERRORS_DIR: [schema.DOC_ID, schema.PAGE_NUMBER, schema.ERROR_TYPE]}
    rewrites, removed = [], 0
    if len(changed) == 0 and len(deleted) == 0:
        return {"files_rewritten": 0, "rows_removed": 0}
    for folder, columns in id_columns.items():
        file_schema = schema.PAGES_FILE_SCHEMA if folder == schema.PAGES_DIR else schema.ERRORS_FILE_SCHEMA
        t = storage.read_columns_per_file(join_uri(output_uri, folder),
                                          pa.schema([file_schema.field(c) for c in columns]), endpoint_url)
        if t is None:
            continue
        mask = _retire_mask(t, changed, deleted)
        affected = pc.unique(pc.filter(t[storage.FILE_COLUMN], mask)).to_pylist()
        removed += int(pc.sum(mask).as_py() or 0)
        kept = t.filter(pc.and_(pc.is_in(t[storage.FILE_COLUMN], value_set=pa.array(affected, pa.string())),
                                pc.invert(mask)))
        keys: dict[str, list[str]] = {name: [] for name in affected}
        for name, key in zip(kept[storage.FILE_COLUMN].to_pylist(), _row_keys(kept)):
            keys[name].append(key)
        for name in sorted(affected):
            new = f"{folder}/{shard_name(keys[name])}" if keys[name] else None
            rewrites.append([f"{folder}/{name}", new])
    if not rewrites:
        return {"files_rewritten": 0, "rows_removed": 0}
    storage.write_json(join_uri(output_uri, schema.RETIRE_JOURNAL), {"rewrites": rewrites}, endpoint_url)
    for old, new in rewrites:
        if new is None or storage.exists(join_uri(output_uri, new), endpoint_url):
            continue
        table = storage.read_parquet(join_uri(output_uri, old), endpoint_url)
        storage.write_parquet(join_uri(output_uri, new), table.filter(pc.invert(_retire_mask(table, changed, deleted))),
                              endpoint_url)  # the file's key-value metadata travels with the table
    if after_write is not None:
        after_write()
    finish_retirement(output_uri, endpoint_url)
    return {"files_rewritten": len(rewrites), "rows_removed": removed}


def record_deleted(output_uri: str, input_uri: str, deleted: pa.Array, progress: pa.Table, metadata: dict,
                   endpoint_url: str | None = None) -> int:
    """One ``SourceDeleted`` error row (stage ``list``) per deleted document that has none yet,
    in one errors shard named by its keys (a rerun writes the same file). Written before the
    document's other rows are retired, so a kill in between loses no record."""
    from pipeline.embed.stages import shard_name

    idx = pc.index_in(deleted, value_set=progress[schema.DOC_ID].combine_chunks())
    new = pc.invert(pc.fill_null(progress["deleted"].take(idx), False))
    ids, idx = pc.filter(deleted, new), pc.filter(idx, new)
    n = len(ids)
    if n == 0:
        return 0
    prefix = input_uri.rstrip("/") + "/"
    table = pa.table({
        schema.DOC_ID: ids,
        schema.SOURCE_URI: pc.binary_join_element_wise(pa.array([prefix] * n, pa.string()), ids, ""),
        schema.PAGE_NUMBER: pa.nulls(n, pa.int32()),
        schema.STAGE: pa.array(["list"] * n, pa.string()),
        schema.ERROR_TYPE: pa.array([schema.SOURCE_DELETED] * n, pa.string()),
        schema.MESSAGE: pa.array(["the source file is no longer listed under --input; its page and error rows "
                                  "were removed (embedded again if it comes back)"] * n, pa.string()),
        schema.DOC_PAGES: pa.nulls(n, pa.int32()),
        schema.SOURCE_SIZE: progress["size_max"].take(idx),
        schema.SOURCE_MTIME: progress["mtime_max"].take(idx),
    }, schema=schema.ERRORS_FILE_SCHEMA)
    meta = {k.encode() if isinstance(k, str) else k: v.encode() if isinstance(v, str) else v
            for k, v in (metadata or {}).items()}
    name = shard_name([f"{d}#None" for d in ids.to_pylist()])
    storage.write_parquet(join_uri(output_uri, schema.ERRORS_DIR, name), table, endpoint_url, meta)
    return n


def reconcile(cfg: EmbedConfig, docs: pa.Table, progress: pa.Table, metadata: dict,
              look_for_deleted: bool = True, after_write=None) -> dict:
    """At run start, under the output lock, with the listing of the whole input: record
    deleted sources, retire the rows of changed and deleted ones (:func:`retire_documents`).
    Changed documents then have no rows, and the plan embeds them whole. Returns the counts
    and examples for the summary."""
    changes = source_changes(docs, progress, cfg.all_files, look_for_deleted)
    changed, deleted = changes["changed"], changes["deleted"]
    if changes["unversioned"]:
        log.info("%d document(s) in %s have rows without a recorded source version (written before versions "
                 "were recorded): treated as unchanged, not re-embedded. Delete their rows (or use a new "
                 "--output) to embed them again", changes["unversioned"], cfg.output)
    markers = record_deleted(cfg.output, cfg.input, deleted, progress, metadata, cfg.endpoint_url) if len(deleted) else 0
    retired = retire_documents(cfg.output, changed, deleted, cfg.endpoint_url, after_write)
    out = {
        "documents_changed": len(changed),
        "documents_deleted": len(deleted),
        "changed_examples": changed.slice(0, CHANGE_EXAMPLES).to_pylist(),
        "deleted_examples": deleted.slice(0, CHANGE_EXAMPLES).to_pylist(),
        "documents_unversioned": changes["unversioned"],
        "source_deleted_rows_written": markers,
        **retired,
    }
    if len(changed) or len(deleted):
        parts = []
        if len(changed):
            parts.append(f"{len(changed)} changed (e.g. {', '.join(out['changed_examples'])}): their old rows "
                         "removed, embedded again")
        if len(deleted):
            parts.append(f"{len(deleted)} deleted (e.g. {', '.join(out['deleted_examples'])}): their rows removed, "
                         f"recorded as {schema.SOURCE_DELETED} error rows")
        log.info("sources since the last run: %s; %d file(s) rewritten, %d row(s) removed", "; ".join(parts),
                 retired["files_rewritten"], retired["rows_removed"])
    return out


# ----------------------------------------------------------------------------- generations


class ConfigMismatchError(ValueError):
    """The output holds vectors made with other settings; the message names the difference."""


# Settings that make vectors comparable, as (summary key, metadata key, how the option is named).
SETTINGS = (("model", schema.META_MODEL, "--model"),
            ("max_visual_tokens", schema.META_MAX_VISUAL_TOKENS, "--max-visual-tokens"),
            ("dtype", schema.META_DTYPE, "--dtype"),
            ("image_prompt", schema.META_PROMPT, "image prompt"),
            ("query_prompt", schema.META_QUERY_PROMPT, "query prompt"),
            ("pool_factor", schema.META_POOL_FACTOR, "--pool-factor"),
            ("precision", schema.META_PRECISION, "--precision"))


def settings_of(metadata: dict) -> dict[str, str]:
    """The comparable settings from a file's (or :func:`pipeline.embed.flow.output_metadata`'s)
    key-value metadata."""
    def get(key: bytes):
        v = metadata.get(key, metadata.get(key.decode()))
        return v.decode() if isinstance(v, bytes) else v

    return {name: get(key) for name, key, _ in SETTINGS if get(key) is not None}


def recorded_settings(root: str, endpoint_url: str | None = None) -> tuple[dict | None, dict | None, str]:
    """(settings, config.json, where from) of what a generation folder already holds:
    config.json's ``settings`` (written since generations exist), else the metadata of a pages
    file (older runs). (None, ..) when it holds nothing: a
    config.json beside no pages file records a run that wrote no row (e.g. one whose model
    failed to load), and does not bind the next run to its settings."""
    try:
        config = storage.read_json(join_uri(root, schema.CONFIG_FILE), endpoint_url)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        config = None
    config = config if isinstance(config, dict) else None
    try:
        fs, files = storage.list_files(join_uri(root, schema.PAGES_DIR), endpoint_url)
    except FileNotFoundError:
        files = []
    if not files:
        if config:
            log.info("%s records settings but no pages file: no vector was written with them; this run's settings "
                     "replace them", join_uri(root, schema.CONFIG_FILE))
        return None, config, ""
    if config and isinstance(config.get("settings"), dict):
        return config["settings"], config, join_uri(root, schema.CONFIG_FILE)
    meta = storage.read_footers(fs, [files[0].path])[0].metadata or {}
    return settings_of(meta), config, files[0].path


def setting_differences(recorded: dict | None, wanted: dict) -> list[tuple[str, str, str]]:
    """(option, recorded value, this run's value) for each comparable setting that differs. A
    dtype recorded as several (a mixed pool of actors) is not compared. An output that records
    no pool factor (written before --pool-factor existed) holds unpooled vectors: factor 1."""
    out = []
    for name, _, option in SETTINGS:
        old, new = (recorded or {}).get(name), wanted.get(name)
        if name == "pool_factor" and old is None and recorded:
            old = "1"
        if name == "precision" and old is None and recorded:
            old = "default"
        if old is None or new is None or (name == "dtype" and "," in str(old)):
            continue
        if str(old) != str(new):
            out.append((option, str(old), str(new)))
    return out


def _differences(cfg: EmbedConfig, metadata: dict) -> tuple[int, str, dict | None, list, str, str]:
    """(current generation, its folder, its config.json, the differing settings, what it holds,
    what this run has) of ``cfg.output`` against this run's ``metadata``."""
    wanted = settings_of(metadata)
    current = storage.current_generation(cfg.output, cfg.endpoint_url)
    root = schema.generation_root(cfg.output, current)
    recorded, config, where = recorded_settings(root, cfg.endpoint_url)
    diffs = setting_differences(recorded, wanted)
    if not diffs:
        return current, root, config, diffs, "", ""
    held = (f"--model {recorded.get('model', '?')} (max_visual_tokens {recorded.get('max_visual_tokens', '?')}, "
            f"{recorded.get('dtype', '?')}"
            + (f", pool factor {recorded.get('pool_factor', '1')}" if any(o == "--pool-factor" for o, _, _ in diffs) else "")
            + f"), recorded in {where}")
    this = "; ".join(f"{opt} {new}" if opt.startswith("--") else f"{opt} {new!r}" for opt, _, new in diffs)
    return current, root, config, diffs, held, this


def refuse_other_settings(cfg: EmbedConfig, metadata: dict) -> None:
    """:class:`ConfigMismatchError` when ``cfg.output`` holds vectors of settings other than
    ``metadata``'s (a setting missing from ``metadata`` is not compared: the job checks the dtype
    before Ray starts only where ``--dtype`` is given, and again once the device is known)."""
    current, _, _, diffs, held, this = _differences(cfg, metadata)
    if diffs:
        raise _mismatch(cfg, current, held, this)


def _mismatch(cfg: EmbedConfig, current: int, held: str, this: str) -> ConfigMismatchError:
    return ConfigMismatchError(
        f"{cfg.output}{'' if current == 1 else f' (generation {current})'} already holds vectors of {held}; "
        f"this run has {this}: vectors of different settings cannot be compared. Use "
        f"a new --output, or --force-new-config to start generation {current + 1} there")


def select_generation(cfg: EmbedConfig, metadata: dict) -> tuple[int, str, dict | None]:
    """(generation, its folder, the config.json it held) for this run, checked before any work
    (after the lock, before config.json is written). The current generation
    (:func:`pipeline.storage.current_generation`) when its settings equal this run's (or it
    holds none); otherwise :class:`ConfigMismatchError`, or with ``--force-new-config`` the
    next generation, ``OUT/generations/<n>``, which ``OUT/generation.json`` then names."""
    current, root, config, diffs, held, this = _differences(cfg, metadata)
    if not diffs:
        return current, root, config
    if not cfg.force_new_config:
        raise _mismatch(cfg, current, held, this)
    new_gen = current + 1
    storage.write_json(join_uri(cfg.output, schema.GENERATION_FILE), {
        "current": new_gen, "folder": f"{schema.GENERATIONS_DIR}/{new_gen}", "previous": current,
        "started_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "differences": [{"setting": opt, "before": old, "now": new} for opt, old, new in diffs],
    }, cfg.endpoint_url)
    log.warning("--force-new-config: %s holds vectors of %s; this run has %s: generation %d starts in %s, "
                "and readers use it from now on (generation %d stays where it is)", cfg.output, held, this,
                new_gen, schema.generation_root(cfg.output, new_gen), current)
    return new_gen, schema.generation_root(cfg.output, new_gen), None
