"""Synthetic corpora, queries and an independent oracle for the scoring tests."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema

MODEL = "tests/tiny-colqwen2"
QUERY_PROMPT = "Query: {text}" + "<|endoftext|>" * 10


def corpus_metadata(model=MODEL, query_prompt=QUERY_PROMPT, max_visual_tokens=768) -> dict[bytes, bytes]:
    return {
        schema.META_MODEL: model.encode(),
        schema.META_PROMPT: b"<image prompt>",
        schema.META_QUERY_PROMPT: query_prompt.encode(),
        schema.META_MAX_VISUAL_TOKENS: str(max_visual_tokens).encode(),
        schema.META_DTYPE: b"float32",
        schema.META_VERSION: b"test",
    }


def random_pages(n_pages, rng, min_len=1, max_len=40, doc_prefix="doc"):
    """[(doc_id, page_number, page_id, float16 (n, 128))], ragged, values of both signs."""
    pages = []
    for i in range(n_pages):
        doc_id = f"{doc_prefix}-{i // 3:03d}.pdf"
        number = i % 3 + 1
        n = int(rng.integers(min_len, max_len + 1))
        pages.append((doc_id, number, schema.page_id(doc_id, number),
                      (rng.standard_normal((n, 128)) / 8).astype(np.float16)))
    return pages


def random_queries(n_queries, rng, min_len=1, max_len=12):
    return [(rng.standard_normal((int(rng.integers(min_len, max_len + 1)), 128)) / 8).astype(np.float16)
            for _ in range(n_queries)]


def pages_table(pages) -> pa.Table:
    return pa.table({
        schema.DOC_ID: [p[0] for p in pages],
        schema.PAGE_NUMBER: pa.array([p[1] for p in pages], pa.int32()),
        schema.PAGE_ID: [p[2] for p in pages],
        schema.SOURCE_URI: [f"file:///in/{p[0]}" for p in pages],
        schema.WIDTH: pa.array([100] * len(pages), pa.int32()),
        schema.HEIGHT: pa.array([100] * len(pages), pa.int32()),
        schema.N_VECTORS: pa.array([len(p[3]) for p in pages], pa.int32()),
        schema.EMBEDDING: schema.embeddings_to_arrow([p[3] for p in pages]),
    }, schema=schema.PAGES_SCHEMA)


def write_corpus(folder, pages, n_files=3, metadata=None) -> str:
    """OUT/pages/part-*.parquet like the embedding job writes; returns OUT."""
    pages_dir = os.path.join(folder, "pages")
    os.makedirs(pages_dir, exist_ok=True)
    meta = metadata or corpus_metadata()
    chunks = np.array_split(np.arange(len(pages)), max(1, n_files)) if pages else [np.arange(0)]
    for i, idx in enumerate(chunks):
        table = pages_table([pages[j] for j in idx])
        table = table.replace_schema_metadata(meta)
        pq.write_table(table, os.path.join(pages_dir, f"part-{i:03d}.parquet"), row_group_size=4)
    return str(folder)


def write_query_embeddings(path, ids, queries, texts=None) -> str:
    texts = texts or [f"query {q}" for q in ids]
    table = pa.table({
        schema.QUERY_ID: ids, schema.TEXT: texts,
        schema.N_VECTORS: pa.array([len(q) for q in queries], pa.int32()),
        schema.EMBEDDING: schema.embeddings_to_arrow(queries),
    }, schema=schema.QUERY_EMBEDDINGS_SCHEMA)
    pq.write_table(table, path)
    return str(path)


def write_queries_jsonl(path, ids, texts=None) -> str:
    texts = texts or [f"query {q}" for q in ids]
    with open(path, "w", encoding="utf-8") as f:
        for q, t in zip(ids, texts):
            f.write(json.dumps({"query_id": q, "text": t}, ensure_ascii=False) + "\n")
    return str(path)


def oracle_scores(queries, pages) -> np.ndarray:
    """float64 MaxSim over real vectors only, written independently of pipeline.score."""
    out = np.empty((len(queries), len(pages)))
    for i, q in enumerate(queries):
        for j, p in enumerate(pages):
            sims = q.astype(np.float64) @ p[3].astype(np.float64).T
            out[i, j] = sims.max(axis=1).sum()
    return out


def oracle_ranking(queries, pages, k):
    """Per query: [(page_id, score)] best first, ties by page_id ascending."""
    scores = oracle_scores(queries, pages)
    result = []
    for i in range(len(queries)):
        order = sorted(range(len(pages)), key=lambda j: (-scores[i, j], pages[j][2]))[:k]
        result.append([(pages[j][2], scores[i, j]) for j in order])
    return result
