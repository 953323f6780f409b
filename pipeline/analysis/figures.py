"""Every notebook figure as a PNG file, so that they can be looked at without Jupyter:

    python -m pipeline.analysis.figures [--demo demo] --out docs/figures [--only NAME ...]

Inputs are the notebooks' (:func:`pipeline.analysis.inputs.notebook_inputs`: the demo's
outputs, or the VDR_* variables)."""

from __future__ import annotations

import argparse
import os
import sys

import pyarrow.compute as pc

from pipeline import schema
from pipeline.analysis import corpus, evaluation, inputs, plots, results, simmap
from pipeline.evaluate import history as history_mod


def corpus_figures(inp: dict) -> dict:
    ep = inp["endpoint_url"]
    pages = inputs.read_pages(inp["corpus"], [schema.DOC_ID, schema.PAGE_ID, schema.N_VECTORS], ep)
    errors = inputs.read_errors(inp["corpus"], ep)
    figs = {"corpus_histograms": plots.corpus_histograms(corpus.documents(pages), pages),
            "corpus_storage": plots.storage_per_file(inputs.file_stats(inp["corpus"], ep)),
            "corpus_summaries": plots.summaries_over_time(corpus.summaries_table(inputs.read_summaries(inp["corpus"], ep)))}
    if errors.num_rows:
        figs["corpus_errors"] = plots.errors_by_type(corpus.error_summary(errors))
    return figs


def gallery_rows(inp: dict, query_ids: list[str] | None = None, k: int = 5) -> tuple[list[dict], dict]:
    """(rows for :func:`plots.top_k_gallery`, {page_id: thumbnail path}) of run A."""
    ep = inp["endpoint_url"]
    res = inputs.read_results(inp["run_a"], ep)
    qemb = inputs.read_query_embeddings(inp["run_a"], ep).select([schema.QUERY_ID, schema.TEXT])
    texts = dict(zip(qemb.column(schema.QUERY_ID).to_pylist(), qemb.column(schema.TEXT).to_pylist()))
    qrels = inputs.qrels_or_none(inp)
    query_ids = query_ids or list(dict.fromkeys(res.column(schema.QUERY_ID).to_pylist()))[:3]
    sources = results.source_uris(inputs.read_pages(inp["corpus"], [schema.PAGE_ID, schema.SOURCE_URI, schema.PAGE_NUMBER], ep))
    rows, thumbs = [], {}
    for qid in query_ids:
        hits = results.top_k(res, qid, k, qrels).to_pylist()
        for h in hits:
            if h[schema.PAGE_ID] in sources and h[schema.PAGE_ID] not in thumbs:
                uri, n = sources[h[schema.PAGE_ID]]
                thumbs[h[schema.PAGE_ID]] = results.thumbnail(uri, n, inp["thumbs"], endpoint_url=ep)
        rows.append({"query_id": qid, "text": texts.get(qid, ""), "hits": hits})
    return rows, thumbs


def results_figures(inp: dict) -> dict:
    ep = inp["endpoint_url"]
    a, b = inputs.read_results(inp["run_a"], ep), inputs.read_results(inp["run_b"], ep)
    name_a, name_b = inputs.run_names(inp["run_a"], inp["run_b"])
    rows, thumbs = gallery_rows(inp)
    return {"results_top_k": plots.top_k_gallery(rows, thumbs),
            "results_scores": plots.score_distributions({name_a: a, name_b: b}),
            "results_overlap": plots.overlap_bars(results.overlap(a, b, k=5), name_a, name_b)}


def default_query_and_page(inp: dict) -> tuple[str, str]:
    """``VDR_QUERY_ID`` / ``VDR_PAGE_ID``, else run A's first query and its top page."""
    res = inputs.read_results(inp["run_a"], inp["endpoint_url"])
    qid = os.environ.get("VDR_QUERY_ID") or res.column(schema.QUERY_ID)[0].as_py()
    top = res.filter(pc.and_(pc.equal(res.column(schema.QUERY_ID), qid), pc.equal(res.column(schema.RANK), 1)))
    return qid, os.environ.get("VDR_PAGE_ID") or top.column(schema.PAGE_ID)[0].as_py()


def simmap_figures(inp: dict) -> dict:
    qid, page_id = default_query_and_page(inp)
    m = simmap.for_page(inp["corpus"], inp["run_a"], qid, page_id, inp["endpoint_url"])
    return {"similarity_map": plots.similarity_maps(m["image"], m["maps"][:7], m["labels"][:7], m["best"][:7],
                                                    total=m["total"])}


def evaluation_figures(inp: dict) -> dict:
    ep = inp["endpoint_url"]
    hist = history_mod.read_history(inp["history"], ep)
    table = evaluation.wins_losses(inputs.read_per_query(inp["eval_a"], ep), inputs.read_per_query(inp["eval_b"], ep),
                                   "nDCG@10")
    name_a, name_b = inputs.run_names(inp["eval_a"], inp["eval_b"])
    return {"evaluation_history": plots.metric_history(evaluation.series(hist)),
            "evaluation_wins_losses": plots.wins_losses(table, "nDCG@10", name_a, name_b)}


GROUPS = {"corpus": corpus_figures, "results": results_figures, "similarity_maps": simmap_figures,
          "evaluation": evaluation_figures}


def save_figures(inp: dict, out: str, only: list[str] | None = None) -> list[str]:
    os.makedirs(out, exist_ok=True)
    written = []
    for name, build in GROUPS.items():
        if only and name not in only:
            continue
        for fig_name, fig in build(inp).items():
            path = os.path.join(out, f"{fig_name}.png")
            with open(path, "wb") as f:
                f.write(plots.png_bytes(fig))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.analysis.figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", help="the demo's workdir (default: VDR_DEMO_DIR, else <repo>/demo)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--only", action="append", choices=sorted(GROUPS), help="one notebook's figures (repeatable)")
    args = p.parse_args(argv)
    env = dict(os.environ)
    if args.demo:
        env["VDR_DEMO_DIR"] = os.path.abspath(args.demo)
    for path in save_figures(inputs.notebook_inputs(env), args.out, args.only):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
