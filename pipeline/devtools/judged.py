"""A small judged collection for evaluation: qrels, runs, an embedded corpus and
query embeddings whose MaxSim ranking is known by construction (no model needed)."""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema


def random_qrels_and_run(seed: int, n_queries: int = 12, n_pages: int = 40, depth: int = 15):
    """(qrels rows, run rows) with graded judgements, unjudged retrieved pages and a judged
    query absent from the run. Scores are distinct so no evaluator's tie rule matters."""
    rng = random.Random(seed)
    pages = [f"doc{d}.pdf#{p}" for d in range(n_pages // 4) for p in range(1, 5)]
    qrels, run = [], []
    for q in range(n_queries):
        qid = f"q{q:02d}"
        judged = rng.sample(pages, 6)
        for page in judged:
            qrels.append((qid, page, rng.choice([0, 1, 1, 2])))
        if q == n_queries - 1:
            continue  # judged, never retrieved
        retrieved = rng.sample(pages, depth)
        scores = sorted(rng.sample(range(10_000), depth), reverse=True)
        for rank, (page, score) in enumerate(zip(retrieved, scores), start=1):
            run.append((qid, page, rank, score / 1000.0))
    run.append(("q_unjudged", pages[0], 1, 9.0))
    return qrels, run


def write_trec_qrels(path, rows) -> str:
    with open(path, "w") as f:
        for qid, page, rel in rows:
            f.write(f"{qid} 0 {schema.trec_id(page)} {rel}\n")
    return str(path)


def write_beir_qrels(path, rows) -> str:
    with open(path, "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, page, rel in rows:
            f.write(f"{qid}\t{page}\t{rel}\n")
    return str(path)


def write_trec_run(path, rows, tag: str = "test") -> str:
    with open(path, "w") as f:
        for qid, page, rank, score in rows:
            f.write(f"{qid} Q0 {schema.trec_id(page)} {rank} {score!r} {tag}\n")
    return str(path)


def results_table(rows) -> pa.Table:
    """Run rows -> a table shaped like the scoring job's results.parquet."""
    return pa.Table.from_pylist(
        [
            {
                schema.QUERY_ID: qid,
                schema.RANK: rank,
                schema.PAGE_ID: page,
                schema.DOC_ID: page.rsplit("#", 1)[0],
                schema.PAGE_NUMBER: int(page.rsplit("#", 1)[1]),
                schema.SCORE: score,
            }
            for qid, page, rank, score in rows
        ],
        schema=schema.RESULTS_SCHEMA,
    )


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, schema.EMBEDDING_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_corpus(root, n_docs: int = 6, pages_per_doc: int = 2, seed: int = 0, model: str = "tiny/colqwen2",
                 max_visual_tokens: int = 768) -> dict:
    """``root/pages/part-0.parquet`` in the embedding job's format; returns {page_id: vectors}."""
    rng = np.random.default_rng(seed)
    rows, vectors = [], {}
    for d in range(n_docs):
        for p in range(1, pages_per_doc + 1):
            doc = f"doc{d}.pdf"
            pid = schema.page_id(doc, p)
            vec = _unit(rng, 6)
            vectors[pid] = vec
            rows.append((doc, p, pid, vec))
    table = pa.Table.from_arrays(
        [
            pa.array([r[0] for r in rows], pa.string()),
            pa.array([r[1] for r in rows], pa.int32()),
            pa.array([r[2] for r in rows], pa.string()),
            pa.array([f"file:///in/{r[0]}" for r in rows], pa.string()),
            pa.array([448] * len(rows), pa.int32()),
            pa.array([448] * len(rows), pa.int32()),
            pa.array([len(r[3]) for r in rows], pa.int32()),
            schema.embeddings_to_arrow([r[3] for r in rows]),
        ],
        schema=schema.PAGES_SCHEMA,
    ).replace_schema_metadata(
        {
            schema.META_MODEL: model.encode(),
            schema.META_PROMPT: b"<image>",
            schema.META_QUERY_PROMPT: b"Query: ",
            schema.META_MAX_VISUAL_TOKENS: str(max_visual_tokens).encode(),
            schema.META_DTYPE: b"float32",
            schema.META_VERSION: b"0.1.0",
        }
    )
    os.makedirs(os.path.join(root, "pages"), exist_ok=True)
    pq.write_table(table, os.path.join(root, "pages", "part-0.parquet"))
    return vectors


def write_query_embeddings(path, targets: dict[str, str], page_vectors: dict, noise: float, seed: int = 1) -> str:
    """Queries whose vectors are their target page's (plus ``noise``): with small noise each
    query ranks its target first; with large noise the ranking is close to random."""
    rng = np.random.default_rng(seed)
    qids = sorted(targets)
    vecs = []
    for qid in qids:
        base = page_vectors[targets[qid]][:3]
        v = base + noise * rng.standard_normal(base.shape).astype(np.float32)
        vecs.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    table = pa.Table.from_arrays(
        [
            pa.array(qids, pa.string()),
            pa.array([f"text of {q}" for q in qids], pa.string()),
            pa.array([len(v) for v in vecs], pa.int32()),
            schema.embeddings_to_arrow(vecs),
        ],
        schema=schema.QUERY_EMBEDDINGS_SCHEMA,
    )
    pq.write_table(table, path)
    return str(path)


def write_queries(path, qids) -> str:
    import json

    with open(path, "w") as f:
        for qid in qids:
            f.write(json.dumps({"query_id": qid, "text": f"text of {qid}"}) + "\n")
    return str(path)
