"""``--preflight``: what a run would do and cost, found without the model and without writing.

The flow (:func:`pipeline.embed.flow.run_preflight`) lists and plans exactly as a run does and
renders every page through :func:`pipeline.embed.stages.render_documents`, in the same CPU
tasks and renderer processes; :func:`preflight_documents` replaces what follows (the model,
the writer) with counting. The report names the documents, the pages, the error rows the run
would write (by type, with examples), the CPU time of rendering (the render tasks' own thread
time plus the CPU time each per-document renderer process reports), the bytes read, and the
GPU-hours the pages will take at a rate per GPU (:func:`gpu_rate`).

It is written to ``OUT/preflight.json`` (:data:`pipeline.schema.PREFLIGHT_FILE`), beside
summary.json; nothing goes to ``OUT/pages`` or ``OUT/errors``, and the output lock is not
taken, so a preflight can run while a real run holds it.
"""

from __future__ import annotations

import collections
import json
import time
from typing import Iterator

import pyarrow as pa

from pipeline import schema
from pipeline.cluster import bytecode_warning
from pipeline.embed import stages

# The job's actor alone (PageEmbedder.__call__, compiled, two batches in flight, batch 32) on one
# H200 at 768 visual tokens per letter page: benchmarks/RESULTS.md, "Fourteenth session", call E,
# 2026-12-05, commit c67ceb4 (65.56 pages/s; 66.45 in call D). A whole job on a warm node runs at
# 77-81% of it (start-up), which GPU-hours of a long run hardly feel. Measured at batch 32 (the
# job's default is 16: 58.6 against 57.8 pages/s at 16 and 32, RESULTS "The job from the actors'
# own counters", 2026-12-03, commit 748c072, before two batches in flight), letter pages (random
# mixes of page sizes ran 6.3% slower in batches, RESULTS "Fourteenth session", call D), on torch
# 2.11.0+cu130. With FlashAttention 4 installed (.[fa4], auto on Hopper) the actor ran 70.09-70.45
# pages/s at batch 16 on an H200 (RESULTS "Thirtieth session", 2026-12-06, commit d50b330); the
# estimate keeps the SDPA figure, which holds wherever FA4 is absent (--gpu-pages-per-second 70 otherwise).
GPU_PAGES_PER_SECOND_AT_768 = 65.6
GPU_RATE_TOKENS = 768
EXAMPLES_PER_TYPE = 3


def gpu_rate(max_visual_tokens: int, override: float | None = None) -> tuple[float, str]:
    """(pages per second per GPU, where the figure comes from). Without ``override``
    (``--gpu-pages-per-second``): the measured H200 rate scaled by 768 / tokens, an estimate
    that takes the model's cost as linear in visual tokens (attention is not, and a small
    budget leaves fixed costs that do not shrink: measure on your GPUs and pass the rate)."""
    if override:
        return float(override), "--gpu-pages-per-second"
    rate = GPU_PAGES_PER_SECOND_AT_768 * GPU_RATE_TOKENS / max_visual_tokens
    return rate, (f"{GPU_PAGES_PER_SECOND_AT_768} pages/s on one H200 at {GPU_RATE_TOKENS} tokens "
                  f"(benchmarks/RESULTS.md, 2026-12-05) x {GPU_RATE_TOKENS}/{max_visual_tokens} tokens: "
                  "an estimate, linear in visual tokens")


def preflight_documents(batch: pa.Table, **render_kwargs) -> Iterator[pa.Table]:
    """Render task of the preflight: ``render_documents`` over the batch, pixels dropped; one
    row out: pages, error rows (JSON), bytes of the files read, CPU seconds."""
    renderer = stages._get_renderer(render_kwargs["render_timeout_s"])
    t0, child0 = time.thread_time(), renderer.cpu_s
    pages, errors, with_pages = 0, [], set()
    for table in stages.render_documents(batch, **render_kwargs):
        is_error = pa.compute.is_valid(table.column(schema.ERROR_TYPE))
        pages += table.num_rows - (pa.compute.sum(is_error).as_py() or 0)
        with_pages.update(table.filter(pa.compute.invert(is_error)).column(schema.DOC_ID).to_pylist())
        errors += table.filter(is_error).select([schema.DOC_ID, schema.PAGE_NUMBER, schema.ERROR_TYPE,
                                                 schema.MESSAGE]).to_pylist()
    cpu_s = (time.thread_time() - t0) + (renderer.cpu_s - child0)
    sizes = [s for s in batch.column("size_bytes").to_pylist() if s <= render_kwargs["max_file_bytes"]]
    yield pa.table({"pages": [pages], "errors": [json.dumps(errors)], "bytes_read": [sum(sizes)],
                    "documents": [batch.num_rows],
                    "documents_failed": [batch.num_rows - len(with_pages)], "cpu_s": [cpu_s]})


class Tally:
    """The driver's sum of :func:`preflight_documents` rows."""

    def __init__(self):
        self.pages = self.bytes_read = self.documents = self.documents_failed = 0
        self.cpu_s = 0.0
        self.by_type: collections.Counter = collections.Counter()
        self.examples: dict[str, list] = {}

    def add(self, row: dict) -> None:
        self.pages += row["pages"]
        self.bytes_read += row["bytes_read"]
        self.documents += row["documents"]
        self.documents_failed += row["documents_failed"]
        self.cpu_s += row["cpu_s"]
        for e in json.loads(row["errors"]):
            self.by_type[e[schema.ERROR_TYPE]] += 1
            shown = self.examples.setdefault(e[schema.ERROR_TYPE], [])
            if len(shown) < EXAMPLES_PER_TYPE:
                shown.append({"doc_id": e[schema.DOC_ID], "page_number": e[schema.PAGE_NUMBER],
                              "message": e[schema.MESSAGE][:300]})


def build_report(cfg, planned: dict, tally: Tally, seconds: float, settings_note: str | None = None) -> dict:
    rate, source = gpu_rate(cfg.max_visual_tokens, cfg.gpu_pages_per_second)
    per_page = tally.cpu_s / tally.pages if tally.pages else None
    return {
        "job": "embed_corpus --preflight",
        "input": cfg.input,
        "output": cfg.output,
        "max_visual_tokens": cfg.max_visual_tokens,
        **planned,
        # every document handed to the renderer, and those of them that gave no page (only error rows)
        "documents_rendered": tally.documents,
        "documents_failed": tally.documents_failed,
        "pages": tally.pages,
        "error_rows": sum(tally.by_type.values()),
        "errors_by_type": dict(tally.by_type.most_common()),
        "error_examples": tally.examples,
        "bytes_read": tally.bytes_read,
        "render_cpu_seconds": round(tally.cpu_s, 3),
        # all the render CPU time (error documents too) over the pages rendered
        "cpu_ms_per_page": round(1000 * per_page, 2) if per_page is not None else None,
        "gpu_pages_per_second": round(rate, 3),
        "gpu_rate_source": source,
        "gpu_hours": round(tally.pages / rate / 3600, 4),
        "settings": settings_note,
        # where the driver's Python compiles torch/transformers at every start (the model
        # actors' image is usually the same): what to change, else None
        "slow_imports": bytecode_warning(),
        "seconds": round(seconds, 3),
    }


def format_report(report: dict) -> str:
    """The short human table printed at the end of a preflight."""
    skipped = sum(e["count"] for e in report["documents_skipped"].values())
    cpu = report["cpu_ms_per_page"]
    lines = [
        f"[embed_corpus --preflight] {report['input']} ({report['seconds']:.1f}s, nothing embedded or written but "
        f"{schema.PREFLIGHT_FILE})",
        f"  documents listed      {report['documents_listed']:>12,}   ({report['documents_already_done']:,} already "
        f"done, {skipped:,} files skipped)",
        f"  documents to do       {report['documents_to_do']:>12,}   ({report['bytes_read']:,} bytes read; "
        f"{report['documents_failed']:,} would give no page, only error rows)",
        *([f"  sources changed       {report['documents_changed']:>12,}   (embedded again; e.g. "
           f"{', '.join(report['changed_examples']) or '-'})",
           f"  sources deleted       {report['documents_deleted']:>12,}   (their rows removed, SourceDeleted rows "
           f"written; e.g. {', '.join(report['deleted_examples']) or '-'})"]
          if report.get("documents_changed") or report.get("documents_deleted") else []),
        f"  pages                 {report['pages']:>12,}",
        f"  error rows            {report['error_rows']:>12,}   "
        + ", ".join(f"{t} {n}" for t, n in report["errors_by_type"].items()),
        f"  CPU ms per page       {f'{cpu:.1f}' if cpu is not None else '-':>12}   (render, one core; "
        f"{report['render_cpu_seconds'] / 3600:.3f} core-hours)",
        f"  GPU-hours             {report['gpu_hours']:>12.3f}   at {report['gpu_pages_per_second']:.1f} pages/s "
        "per GPU (--gpu-pages-per-second)",
    ]
    for etype, examples in report["error_examples"].items():
        for e in examples:
            page = f" page {e['page_number']}" if e["page_number"] is not None else ""
            lines.append(f"    {etype}: {e['doc_id']}{page}: {e['message'][:120]}")
    for reason, entry in report["documents_skipped"].items():
        lines.append(f"    skipped ({reason.replace('_', ' ')}): {entry['count']}, e.g. {', '.join(entry['examples'][:3])}")
    if report.get("settings"):
        lines.append(f"  note: {report['settings']}")
    if report.get("slow_imports"):
        lines.append(f"  note: {report['slow_imports']}")
    return "\n".join(lines)
