"""What a run has to do: the input listing against what ``OUT`` already holds.

Layout (DESIGN.md): ``OUT/pages/*.parquet``, ``OUT/errors/*.parquet``, ``OUT/summary.json``.
Files are named by a hash of the page keys they hold and written whole or not at all
(:func:`pipeline.embed.stages.write_shard`). A rerun reads only the id columns of what
exists and renders again only documents that are missing or cut short, skipping their
done pages, so it never writes a row twice.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import pyarrow as pa

from pipeline import schema
from pipeline import storage
from pipeline.config import EmbedConfig
from pipeline.storage import DOCUMENT_EXTENSIONS, join_uri, list_documents

log = logging.getLogger(__name__)

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
    pages = storage.read_columns(join_uri(output_uri, schema.PAGES_DIR), [schema.DOC_ID, schema.PAGE_NUMBER, schema.DOC_PAGES],
                         endpoint_url)
    if pages is not None:
        d = pages.to_pydict()
        for doc, page, n in zip(d[schema.DOC_ID], d[schema.PAGE_NUMBER], d.get(schema.DOC_PAGES, [None] * len(d[schema.DOC_ID]))):
            p = progress.setdefault(doc, DocProgress(set()))
            p.done_pages.add(page)
            p.n_pages = n if n is not None else p.n_pages
    errors = storage.read_columns(join_uri(output_uri, schema.ERRORS_DIR),
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
    return storage.delete_files(join_uri(output_uri, schema.ERRORS_DIR), endpoint_url)


def output_totals(output_uri: str, endpoint_url: str | None = None) -> dict:
    """Counts over everything in OUT (this run and earlier ones)."""
    totals = {"documents_with_pages": 0, "pages": 0, "vectors": 0, "error_rows": 0, "errors_by_type": {}}
    pages = storage.read_columns(join_uri(output_uri, schema.PAGES_DIR), [schema.DOC_ID, schema.N_VECTORS], endpoint_url)
    if pages is not None:
        totals["pages"] = pages.num_rows
        totals["vectors"] = int(pa.compute.sum(pages[schema.N_VECTORS]).as_py() or 0)
        totals["documents_with_pages"] = len(pa.compute.unique(pages[schema.DOC_ID]))
    errors = storage.read_columns(join_uri(output_uri, schema.ERRORS_DIR), [schema.ERROR_TYPE], endpoint_url)
    if errors is not None:
        totals["error_rows"] = errors.num_rows
        totals["errors_by_type"] = dict(collections.Counter(errors[schema.ERROR_TYPE].to_pylist()).most_common())
    return totals


def plan_documents(cfg: EmbedConfig) -> tuple[list[dict], dict]:
    """Documents to (re)do, with the pages of each that an earlier run already wrote."""
    docs = list_documents(cfg.input, cfg.endpoint_url, None if cfg.all_files else DOCUMENT_EXTENSIONS)
    progress = load_progress(cfg.output, cfg.endpoint_url)
    todo, complete, resumed = [], 0, 0
    for d in docs:
        p = progress.get(d.doc_id)
        if p is not None and p.complete():
            complete += 1
            continue
        skip = sorted(p.done_pages) if p else []
        resumed += bool(skip)
        todo.append({"doc_id": d.doc_id, "source_uri": d.source_uri, "size_bytes": d.size_bytes, "skip_pages": skip})
    return todo, {"documents_listed": len(docs), "documents_already_done": complete, "documents_resumed": resumed}
