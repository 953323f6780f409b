"""The notebooks' figures, as functions that return a matplotlib Figure (no pyplot, no
global state); :func:`show` displays one in a notebook, :func:`png_bytes` saves it."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa

from pipeline import schema


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=90, layout="constrained")


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def show(fig) -> None:
    """Display a Figure in a notebook as a PNG (whatever matplotlib backend the kernel has)."""
    from IPython.display import Image, display

    display(Image(png_bytes(fig)))


# ----------------------------------------------------------------------------- corpus

def corpus_histograms(documents: pa.Table, pages: pa.Table):
    """Pages per document and vectors per page."""
    fig = _figure(9, 3)
    a, b = fig.subplots(1, 2)
    per_doc = documents.column("pages").to_numpy()
    a.hist(per_doc, bins=np.arange(0.5, per_doc.max() + 1.5, 1), color="tab:blue", edgecolor="white")
    a.set(title="pages per document", xlabel="pages", ylabel="documents")
    b.hist(pages.column(schema.N_VECTORS).to_numpy(), bins=20, color="tab:green", edgecolor="white")
    b.set(title="vectors per page", xlabel="vectors (n_vectors)", ylabel="pages")
    return fig


def errors_by_type(summary: pa.Table):
    """Error rows per error type (from :func:`pipeline.analysis.corpus.error_summary`)."""
    fig = _figure(6, 0.5 + 0.45 * max(summary.num_rows, 1))
    ax = fig.subplots()
    types, counts = summary.column("error_type").to_pylist(), summary.column("rows").to_pylist()
    ax.barh(types[::-1], counts[::-1], color="tab:red")
    ax.set(title="error rows by type", xlabel="rows")
    return fig


def storage_per_file(stats: pa.Table):
    """Bytes per page in each pages file, embedding column vs the rest."""
    fig = _figure(6, 3)
    ax = fig.subplots()
    rows = np.maximum(stats.column("rows").to_numpy(), 1)
    x = np.arange(stats.num_rows)
    emb, other = stats.column("embedding_bytes").to_numpy() / rows, stats.column("other_bytes").to_numpy() / rows
    ax.bar(x, emb, label="embedding", color="tab:purple")
    ax.bar(x, other, bottom=emb, label="other columns", color="tab:gray")
    ax.set_xticks(x, [f[:14] for f in stats.column("file").to_pylist()], rotation=30, ha="right", fontsize=7)
    ax.set(title="stored bytes per page, by file", ylabel="bytes / page")
    ax.legend(fontsize=8)
    return fig


def summaries_over_time(table: pa.Table):
    """Each embedding run: pages embedded and pages per second."""
    fig = _figure(8, 3)
    a, b = fig.subplots(1, 2)
    labels = [s or "?" for s in table.column("started_at").to_pylist()]
    x = np.arange(len(labels))
    a.bar(x, [v or 0 for v in table.column("pages").to_pylist()], color="tab:blue")
    a.set(title="pages embedded per run", ylabel="pages")
    b.plot(x, [v or 0 for v in table.column("pages_per_second").to_pylist()], marker="o")
    b.set(title="pages per second per run", ylabel="pages/s")
    for ax in (a, b):
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    return fig


# ----------------------------------------------------------------------------- results

def top_k_gallery(rows: list[dict], thumbs: dict[str, str]):
    """One row of thumbnails per query: ``rows`` items are {query_id, text, hits: [{rank,
    page_id, score, relevance}]}; ``thumbs`` maps page_id -> PNG path. Judged pages framed
    green (relevant) or red (judged not relevant)."""
    from PIL import Image

    k = max((len(r["hits"]) for r in rows), default=1)
    fig = _figure(1.7 * k + 0.3, 2.3 * len(rows))
    axes = np.asarray(fig.subplots(len(rows), k, squeeze=False))
    for i, r in enumerate(rows):
        for j in range(k):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(r["hits"]):
                ax.set_visible(False)
                continue
            h = r["hits"][j]
            if h["page_id"] in thumbs:
                ax.imshow(np.asarray(Image.open(thumbs[h["page_id"]])))
            rel = h.get("relevance")
            color = "tab:green" if rel and rel > 0 else ("tab:red" if rel == 0 else "lightgray")
            for s in ax.spines.values():
                s.set(color=color, linewidth=3)
            ax.set_title(f"#{h['rank']} {h['page_id'].rsplit('/', 1)[-1][-20:]}\n{h['score']:.3f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{r['query_id']}\n{r['text'][:28]}", fontsize=7)
    return fig


def score_distributions(results: dict[str, pa.Table]):
    """Per run: the scores of every query's top-k (box per query)."""
    fig = _figure(4.5 * len(results), 3)
    axes = np.atleast_1d(fig.subplots(1, len(results), sharey=True))
    for ax, (name, t) in zip(axes, results.items()):
        qids = sorted(set(t.column(schema.QUERY_ID).to_pylist()))
        data = [[s for q, s in zip(t.column(schema.QUERY_ID).to_pylist(), t.column(schema.SCORE).to_pylist()) if q == qid]
                for qid in qids]
        ax.boxplot(data)
        ax.set_xticks(np.arange(1, len(qids) + 1), qids, rotation=30, ha="right", fontsize=7)
        ax.set(title=f"top-k scores: {name}", ylabel="MaxSim score")
    return fig


def overlap_bars(table: pa.Table, name_a: str, name_b: str):
    """Per query: Jaccard of the two top-k sets and rank-biased overlap."""
    fig = _figure(7, 3)
    ax = fig.subplots()
    q = table.column("query_id").to_pylist()
    x = np.arange(len(q))
    ax.bar(x - 0.2, table.column("jaccard").to_pylist(), width=0.4, label="Jaccard of top-k")
    ax.bar(x + 0.2, table.column("rbo").to_pylist(), width=0.4, label="rank-biased overlap")
    ax.set_xticks(x, q, rotation=30, ha="right", fontsize=7)
    ax.set(ylim=(0, 1.05), title=f"ranking overlap: {name_a} vs {name_b}")
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- similarity maps

def similarity_maps(image: np.ndarray, maps: np.ndarray, labels: list[str], best: list[tuple] | None = None,
                    total: np.ndarray | None = None, cols: int = 4):
    """colpali-engine's drawing: the page, and over it each token's similarity map
    normalised to [0, 1], upsampled bicubically to the page's size, alpha 0.5; the token's
    best patch boxed. ``total`` (optional): the MaxSim contribution map, drawn first."""
    from matplotlib.patches import Rectangle

    from pipeline.analysis.simmap import PATCH_PX, upsample

    panels = ([("MaxSim per patch", total, None)] if total is not None else []) + \
        [(lab, m, best[i] if best else None) for i, (lab, m) in enumerate(zip(labels, maps))]
    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    h, w = image.shape[:2]
    fig = _figure(2.6 * cols, 2.6 * rows * h / w + 0.4)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (label, m, b) in zip(axes, panels):
        ax.imshow(image)
        ax.imshow(upsample(m, (w, h)), cmap="magma", alpha=0.5)
        if b is not None:
            ax.add_patch(Rectangle((b[1] * PATCH_PX, b[0] * PATCH_PX), PATCH_PX, PATCH_PX, fill=False,
                                   edgecolor="cyan", linewidth=1.5))
            label = f"{label!r} {b[2]:.2f}"
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


# ----------------------------------------------------------------------------- evaluation

def metric_history(series, measures: list[str] | None = None):
    """Each metric over runs (time order), regressed runs marked with a red x."""
    measures = measures or list(dict.fromkeys(series["measure"]))
    cols = min(3, max(len(measures), 1))
    rows = math.ceil(max(len(measures), 1) / cols)
    fig = _figure(3.6 * cols, 2.6 * rows)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, m in zip(axes, measures):
        s = series[series["measure"] == m]
        x = np.arange(len(s))
        ax.plot(x, s["value"], marker="o", color="tab:blue")
        bad = s["regressed"].to_numpy()
        ax.scatter(x[bad], s["value"].to_numpy()[bad], marker="x", s=80, color="tab:red", zorder=3,
                   label="regression")
        ax.set_xticks(x, s["run_id"], rotation=30, ha="right", fontsize=7)
        ax.set_title(m)
        ax.grid(True, alpha=0.3)
        if bad.any():
            ax.legend(fontsize=7)
    for ax in axes[len(measures):]:
        ax.set_visible(False)
    return fig


def wins_losses(table, measure: str, name_a: str, name_b: str):
    """Per query: the change of ``measure`` from run a to run b (green: b wins)."""
    fig = _figure(7, 0.6 + 0.35 * max(len(table), 1))
    ax = fig.subplots()
    colors = {"win": "tab:green", "loss": "tab:red", "tie": "tab:gray"}
    ax.barh(table["query_id"][::-1], table["delta"][::-1], color=[colors[o] for o in table["outcome"][::-1]])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(title=f"{measure}: {name_b} minus {name_a} per query", xlabel="delta")
    return fig
