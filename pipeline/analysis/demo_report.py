"""What ``python -m jobs.demo`` prints at the end: ranked results of two queries, the metric
table of the runs it evaluated, and where the outputs and notebooks are."""

from __future__ import annotations

import os

from pipeline.analysis import evaluation, inputs, results
from pipeline.analysis.inputs import demo_paths  # noqa: F401  (the demo's layout, used by jobs.demo)
from pipeline.evaluate import history as history_mod
from pipeline.evaluate import runs

SHOWN_QUERIES = ("q-revenue", "q-invoice")
MEASURES = ("nDCG@5", "nDCG@10", "R@10", "RR@10", "AP")


def ranked_lines(paths: dict, budget: int, query_ids=SHOWN_QUERIES, k: int = 5) -> list[str]:
    from pipeline.devtools.samples import SAMPLE_QUERIES

    run = paths["runs"][budget]
    table = inputs.read_results(run["scores"])
    qrels = results.qrels_dict(runs.read_qrels(paths["qrels"]))
    lines = []
    for qid in query_ids:
        lines.append(f"{qid}: {SAMPLE_QUERIES.get(qid, '')!r}  (run {run['run_id']})")
        for r in results.top_k(table, qid, k, qrels).to_pylist():
            rel = r["relevance"]
            mark = "relevant" if rel and rel > 0 else ("judged not relevant" if rel == 0 else "")
            lines.append(f"  {r['rank']:>2}. {r['page_id']:<28} {r['score']:9.4f}  {mark}")
    return lines


def metric_lines(history_uri: str, measures=MEASURES) -> list[str]:
    table = evaluation.metric_table(history_mod.read_history(history_uri))
    cols = [m for m in measures if m in table.columns]
    head = f"{'run':<14}{'tokens':>7}" + "".join(f"{m:>9}" for m in cols)
    lines = [head]
    for run_id, row in table.iterrows():
        tokens = row.get("max_visual_tokens")
        lines.append(f"{run_id:<14}{'' if tokens is None else int(tokens):>7}" + "".join(f"{row[m]:9.4f}" for m in cols))
    return lines


def _short(path: str) -> str:
    """Relative to the working directory when under it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def render(paths: dict, budgets, seconds: float | None = None) -> str:
    work = paths["workdir"]
    out = ["The model is a tiny RANDOM ColQwen2 built offline, so these rankings and metrics are arbitrary:",
           "the demo shows the plumbing (embed -> score -> evaluate -> history), not retrieval quality.", ""]
    out += ranked_lines(paths, budgets[0])
    out += ["", f"metrics ({paths['history']}):"] + metric_lines(paths["history"])
    rel = _short(work)
    out += ["", "outputs:"]
    for b in budgets:
        r = paths["runs"][b]
        out.append(f"  {b:>4} tokens: embeddings {_short(r['corpus'])}, scores {_short(r['scores'])}, "
                   f"evaluation {_short(r['eval'])}")
    out += [f"  history: {_short(paths['history'])}",
            "",
            "notebooks (they read these outputs; VDR_DEMO_DIR or VDR_CORPUS/VDR_RUN_A/... name others, s3:// too):",
            f"  VDR_DEMO_DIR={os.path.abspath(work)} jupyter lab notebooks/",
            f"  python -m pipeline.analysis.figures --demo {rel} --out {os.path.join(rel, 'figures')}   # every figure as PNG"]
    if seconds is not None:
        out.append(f"\ndemo done in {seconds:.0f} s")
    return "\n".join(out)
