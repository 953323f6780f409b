"""Parquet output: deterministic names, atomic writes, and what a rerun may skip.

Layout (DESIGN.md): ``OUT/pages/*.parquet``, ``OUT/errors/*.parquet``, ``OUT/summary.json``.
A file's name is a hash of the page keys it holds, and it is written whole or not at all
(``sources.write_bytes_atomic``). A rerun reads only the id columns of what exists and
renders again only documents that are missing or cut short, skipping their done pages,
so it never writes a row twice.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.storage import join_uri, open_filesystem, write_bytes_atomic

log = logging.getLogger(__name__)

PAGES_DIR = "pages"
ERRORS_DIR = "errors"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


def shard_name(keys: list[str]) -> str:
    """Deterministic file name for a set of row keys (page ids)."""
    digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"


# Pages per row group: readers (the scoring job, pyarrow.dataset) decode row groups in
# parallel, and a nested list of ~100k float16 values per page decodes slowly in one thread.
ROW_GROUP_PAGES = 32


def table_to_parquet_bytes(table: pa.Table, metadata: dict[bytes, bytes] | None = None) -> bytes:
    """Parquet bytes of ``table``. No dictionary encoding: on embedding values it only costs
    (measured: reads 2.6x faster without it, files 2% larger, benchmarks/RESULTS.md)."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=False, row_group_size=ROW_GROUP_PAGES,
                   write_statistics=[c for c in table.column_names if c != schema.EMBEDDING])
    return buf.getvalue()


def write_table(table: pa.Table, uri: str, endpoint_url: str | None = None,
                metadata: dict[bytes, bytes] | None = None) -> None:
    write_bytes_atomic(uri, table_to_parquet_bytes(table, metadata), endpoint_url)


def write_json(uri: str, obj, endpoint_url: str | None = None) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode(), endpoint_url)


def _dataset(uri: str, endpoint_url: str | None):
    fs, path = open_filesystem(uri, endpoint_url)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return None
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))
             if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
             and not i.base_name.startswith((".", "_"))]
    if not files:
        return None
    return pads.dataset(sorted(files), format="parquet", filesystem=fs)


def read_columns(uri: str, columns: list[str], endpoint_url: str | None = None) -> pa.Table | None:
    ds = _dataset(uri, endpoint_url)
    if ds is None:
        return None
    present = [c for c in columns if c in ds.schema.names]
    return ds.to_table(columns=present)


@dataclasses.dataclass
class DocProgress:
    done_pages: set
    n_pages: int | None = None
    finished: bool = False  # a document-level error, or a terminal page error

    def complete(self) -> bool:
        if self.finished:
            return True
        return self.n_pages is not None and len(self.done_pages) >= self.n_pages


def load_progress(output_uri: str, endpoint_url: str | None = None) -> dict[str, DocProgress]:
    """What earlier runs wrote, per doc_id (id columns only)."""
    progress: dict[str, DocProgress] = {}
    pages = read_columns(join_uri(output_uri, PAGES_DIR), [schema.DOC_ID, schema.PAGE_NUMBER, schema.DOC_PAGES],
                         endpoint_url)
    if pages is not None:
        d = pages.to_pydict()
        for doc, page, n in zip(d[schema.DOC_ID], d[schema.PAGE_NUMBER], d.get(schema.DOC_PAGES, [None] * len(d[schema.DOC_ID]))):
            p = progress.setdefault(doc, DocProgress(set()))
            p.done_pages.add(page)
            p.n_pages = n if n is not None else p.n_pages
    errors = read_columns(join_uri(output_uri, ERRORS_DIR),
                          [schema.DOC_ID, schema.PAGE_NUMBER, schema.ERROR_TYPE, schema.DOC_PAGES], endpoint_url)
    if errors is not None:
        d = errors.to_pydict()
        n_rows = len(d[schema.DOC_ID])
        for doc, page, etype, n in zip(d[schema.DOC_ID], d[schema.PAGE_NUMBER], d[schema.ERROR_TYPE],
                                       d.get(schema.DOC_PAGES, [None] * n_rows)):
            p = progress.setdefault(doc, DocProgress(set()))
            if n is not None:
                p.n_pages = n
            if page is None or etype in schema.TERMINAL_PAGE_ERRORS:
                p.finished = True
            else:
                p.done_pages.add(page)
    return progress


def remove_error_files(output_uri: str, endpoint_url: str | None = None) -> int:
    """Delete OUT/errors/*.parquet so a rerun tries those documents again.

    Safe at any moment: a document without rows is simply redone, so a crash halfway
    leaves no duplicates, only work for the next run."""
    fs, path = open_filesystem(join_uri(output_uri, ERRORS_DIR), endpoint_url)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return 0
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File
             and i.base_name.endswith(".parquet")]
    for f in files:
        fs.delete_file(f)
    return len(files)


def output_totals(output_uri: str, endpoint_url: str | None = None) -> dict:
    """Counts over everything in OUT (this run and earlier ones)."""
    totals = {"documents_with_pages": 0, "pages": 0, "vectors": 0, "error_rows": 0, "errors_by_type": {}}
    pages = read_columns(join_uri(output_uri, PAGES_DIR), [schema.DOC_ID, schema.N_VECTORS], endpoint_url)
    if pages is not None:
        totals["pages"] = pages.num_rows
        totals["vectors"] = int(pa.compute.sum(pages[schema.N_VECTORS]).as_py() or 0)
        totals["documents_with_pages"] = len(pa.compute.unique(pages[schema.DOC_ID]))
    errors = read_columns(join_uri(output_uri, ERRORS_DIR), [schema.ERROR_TYPE], endpoint_url)
    if errors is not None:
        totals["error_rows"] = errors.num_rows
        totals["errors_by_type"] = dict(collections.Counter(errors[schema.ERROR_TYPE].to_pylist()).most_common())
    return totals
