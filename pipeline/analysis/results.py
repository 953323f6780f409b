"""A scoring run, looked at: each query's top-k (with judgements when given), page
thumbnails rendered again from the source documents (small, cached on disk), score
distributions, and how two runs' rankings overlap."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema, storage


def top_k(results: pa.Table, query_id: str, k: int = 5, qrels: dict | None = None) -> pa.Table:
    """The query's first ``k`` rows (rank, page_id, doc_id, page_number, score), plus
    ``relevance`` from ``qrels`` ({(query_id, page_id): rel}; unjudged: null) when given."""
    rows = results.filter(pc.and_(pc.equal(results.column(schema.QUERY_ID), query_id),
                                  pc.less_equal(results.column(schema.RANK), k))).sort_by(schema.RANK)
    if qrels is not None:
        rel = [qrels.get((query_id, p)) for p in rows.column(schema.PAGE_ID).to_pylist()]
        rows = rows.append_column("relevance", pa.array(rel, pa.int64()))
    return rows.drop_columns([schema.QUERY_ID])


def qrels_dict(qrels_frame) -> dict:
    """``pipeline.evaluate.runs.read_qrels`` frame -> {(query_id, page_id): relevance}."""
    cols = list(qrels_frame.columns)
    q, d, r = cols[0], cols[1], cols[2]
    return {(a, b): int(c) for a, b, c in zip(qrels_frame[q], qrels_frame[d], qrels_frame[r])}


def source_page_image(source_uri: str, page_number: int, max_visual_tokens: int = 768,
                      endpoint_url: str | None = None) -> np.ndarray:
    """The page as the embedding job rendered it for this token budget: (H, W, 3) uint8 on the
    model's grid (the same code, pipeline.embed.rasterize, run here in this process)."""
    from pipeline.embed import rasterize

    data = storage.read_bytes(source_uri, endpoint_url)
    spec = rasterize.RenderSpec(max_visual_tokens=max_visual_tokens)
    done = frozenset(n for n in range(1, page_number))  # render only the page asked for
    for item in rasterize.iter_document(data, spec, skip=done):
        if isinstance(item, rasterize.PageItem) and item.page_number == page_number:
            return item.image
        if isinstance(item, rasterize.ErrorItem) and item.page_number in (None, page_number):
            raise ValueError(f"{source_uri} page {page_number}: {item.error_type}: {item.message}")
    raise KeyError(f"{source_uri} has no page {page_number}")


def thumbnail(source_uri: str, page_number: int, cache_dir: str, max_side: int = 160,
              endpoint_url: str | None = None) -> str:
    """Path of a small PNG of the page (longest side ``max_side``), rendered once from the
    source at a small token budget and cached in ``cache_dir`` by (uri, page, size)."""
    from PIL import Image

    key = hashlib.sha1(f"{source_uri}\n{page_number}\n{max_side}".encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"{key}.png")
    if os.path.exists(path):
        return path
    image = Image.fromarray(source_page_image(source_uri, page_number, max_visual_tokens=64, endpoint_url=endpoint_url))
    image.thumbnail((max_side, max_side))
    os.makedirs(cache_dir, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return path


def source_uris(corpus_pages: pa.Table) -> dict[str, tuple[str, int]]:
    """{page_id: (source_uri, page_number)} from page rows."""
    return {p: (u, n) for p, u, n in zip(corpus_pages.column(schema.PAGE_ID).to_pylist(),
                                        corpus_pages.column(schema.SOURCE_URI).to_pylist(),
                                        corpus_pages.column(schema.PAGE_NUMBER).to_pylist())}


def score_stats(results: pa.Table) -> pa.Table:
    """Per query: ``top1``, ``kth`` (the last score kept), ``gap`` (top1 - second) and ``mean``."""
    out = []
    for qid in results.column(schema.QUERY_ID).unique().to_pylist():
        s = np.sort(results.filter(pc.equal(results.column(schema.QUERY_ID), qid)).column(schema.SCORE)
                    .to_numpy().astype(np.float64))[::-1]
        out.append({"query_id": qid, "top1": s[0], "kth": s[-1], "gap": s[0] - s[1] if len(s) > 1 else None,
                    "mean": float(s.mean())})
    return pa.Table.from_pylist(out)


def rbo(a: list, b: list, p: float = 0.9) -> float:
    """Rank-biased overlap of two rankings (Webber et al. 2010), extrapolated (RBO_ext) to the
    depth seen: 1 for identical lists, 0 for disjoint ones; top ranks weigh most.

    >>> rbo(["a", "b", "c"], ["a", "b", "c"]), rbo(["a"], ["b"])
    (1.0, 0.0)
    """
    k = min(len(a), len(b))
    if k == 0:
        return 0.0
    seen_a, seen_b, overlap, total = set(), set(), 0, 0.0
    for d in range(1, k + 1):
        x, y = a[d - 1], b[d - 1]
        if x == y:
            overlap += 1
        else:
            overlap += (x in seen_b) + (y in seen_a)
        seen_a.add(x)
        seen_b.add(y)
        total += (overlap / d) * p ** d
    return float(overlap / k * p ** k + (1 - p) / p * total)


def overlap(results_a: pa.Table, results_b: pa.Table, k: int = 10) -> pa.Table:
    """Per query in both runs: ``common`` pages in both top-k, ``jaccard``, ``same_top1`` and
    ``rbo`` (rank-biased overlap, p=0.9) of the two top-k lists."""
    def ranked(t):
        t = t.filter(pc.less_equal(t.column(schema.RANK), k)).sort_by([(schema.QUERY_ID, "ascending"),
                                                                        (schema.RANK, "ascending")])
        out: dict[str, list] = {}
        for q, p in zip(t.column(schema.QUERY_ID).to_pylist(), t.column(schema.PAGE_ID).to_pylist()):
            out.setdefault(q, []).append(p)
        return out

    ra, rb = ranked(results_a), ranked(results_b)
    rows = []
    for q in [q for q in ra if q in rb]:
        a, b = ra[q], rb[q]
        common = len(set(a) & set(b))
        rows.append({"query_id": q, "common": common, "jaccard": common / len(set(a) | set(b)),
                     "same_top1": a[0] == b[0], "rbo": rbo(a, b)})
    return pa.Table.from_pylist(rows, schema=pa.schema([("query_id", pa.string()), ("common", pa.int64()),
                                                        ("jaccard", pa.float64()), ("same_top1", pa.bool_()),
                                                        ("rbo", pa.float64())]))
