"""The whole system on this machine, offline: builds a tiny random ColQwen2, writes a sample
corpus with queries and judgements, embeds it at two visual-token budgets
(jobs.embed_corpus), scores the queries against each (jobs.score_queries), evaluates both
runs into one history (jobs.offline_eval), and prints ranked results and the metric table.

    python -m jobs.demo [--workdir demo] [--budgets 768,256]

The notebooks (notebooks/*.ipynb) read these outputs by default.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo", help="where model, corpus and outputs go (default: %(default)s)")
    p.add_argument("--budgets", default="768,256", metavar="N,N",
                   help="visual-token budgets to embed and compare, one run each (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=10,
                   help="results per query (default: %(default)s, the default measures' deepest cutoff)")
    return p


def _step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    from jobs import embed_corpus, offline_eval, score_queries
    from pipeline.analysis import demo_report
    from pipeline.devtools import samples
    from pipeline.devtools.tiny import build_tiny_model

    started = time.time()
    work = os.path.abspath(args.workdir)
    paths = demo_report.demo_paths(work, budgets)
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(paths["model"], "config.json")):
        build_tiny_model(paths["model"])
    if not os.path.isdir(paths["corpus"]) or not os.listdir(paths["corpus"]):
        samples.make_sample_corpus(paths["corpus"])  # kept after: a second demo's embedding is a rerun
    samples.write_sample_queries(paths["queries"])
    samples.write_sample_qrels(paths["qrels"])
    # Each demo starts its history afresh: a second demo would otherwise compare its first budget with the
    # last budget of the one before and report a regression between two settings, not two versions.
    shutil.rmtree(paths["history"], ignore_errors=True)

    query_embeddings: list[str] = []  # queries do not depend on the pages' budget: embed them once
    for budget in budgets:
        run = paths["runs"][budget]
        _step(f"1/3 embed_corpus: sample corpus at {budget} visual tokens -> {run['corpus']}")
        rc = embed_corpus.main(["--input", paths["corpus"], "--output", run["corpus"], "--model", paths["model"],
                                "--batch-size", "4", "--max-visual-tokens", str(budget)])
        if rc != 0:
            return rc
        _step(f"2/3 score_queries: {len(samples.SAMPLE_QUERIES)} queries, top {args.top_k} -> {run['scores']}")
        rc = score_queries.main(["--corpus", run["corpus"], "--queries", paths["queries"], "--output", run["scores"],
                                 "--top-k", str(args.top_k), "--num-actors", "1", *query_embeddings])
        if rc != 0:
            return rc
        query_embeddings = query_embeddings or ["--query-embeddings", os.path.join(run["scores"], "query_embeddings.parquet")]
        _step(f"3/3 offline_eval: metrics and history row {run['run_id']} -> {paths['eval']}")
        rc = offline_eval.main(["--run", os.path.join(run["scores"], "results.parquet"), "--corpus", run["corpus"],
                                "--queries", paths["queries"], "--qrels", paths["qrels"], "--top-k", str(args.top_k),
                                "--output-root", paths["eval"], "--history", paths["history"],
                                "--run-id", run["run_id"], "--no-fail-on-regression"])
        if rc != 0:
            return rc

    _step("results")
    print(demo_report.render(paths, budgets, seconds=time.time() - started))
    return 0


if __name__ == "__main__":
    from pipeline import cli

    sys.exit(cli.guarded(main, prog="demo"))
