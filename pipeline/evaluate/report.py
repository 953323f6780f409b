"""Per-run Markdown report: metric table, change against the previous run and the baseline,
and a plot of every metric over the history (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import pandas as pd

from pipeline.evaluate.history import measure_columns
from pipeline.evaluate.regression import Baseline, Comparison

PLOT_FILE = "history.png"


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _delta(value) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}"


def metrics_table(
    metrics: Mapping[str, float], comparisons: Sequence[Comparison]
) -> list[str]:
    """Markdown rows: measure | value | (reference, change) per comparison | status."""
    header = ["measure", "value"]
    for c in comparisons:
        header += [c.label, f"Δ {c.label}"]
    header.append("status")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_label = {c.label: {ch.measure: ch for ch in c.changes} for c in comparisons}
    for measure, value in metrics.items():
        row = [f"`{measure}`", _fmt(value)]
        status = "ok"
        for c in comparisons:
            change = by_label[c.label].get(measure)
            row += [_fmt(change.reference if change else None), _delta(change.delta if change else None)]
            if change is not None and change.regressed:
                status = f"**REGRESSION** vs {c.label}"
        row.append(status)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render_markdown(
    run: Mapping,
    metrics: Mapping[str, float],
    comparisons: Sequence[Comparison],
    baseline: Baseline | None,
    regressions: Sequence[str],
    warnings: Sequence[str],
    counts: Mapping | None = None,
    plot_name: str | None = PLOT_FILE,
) -> str:
    """The report text. ``run`` is the history row (run_id, run_time, model, ...)."""
    out = [f"# Offline evaluation `{run['run_id']}`", ""]
    verdict = "**REGRESSION**" if regressions else "no regression"
    out += [f"Result: {verdict}.", ""]
    out += [
        f"- time: {run.get('run_time')}",
        f"- model: `{run.get('model')}`, max visual tokens: {run.get('max_visual_tokens')}, top-k: {run.get('top_k')}",
        f"- corpus: `{run.get('corpus_uri')}` (fingerprint `{run.get('corpus_fingerprint')}`, "
        f"{run.get('corpus_pages')} pages)",
        f"- queries: `{run.get('queries_uri')}`; qrels: `{run.get('qrels_uri')}` "
        f"(fingerprint `{run.get('qrels_fingerprint')}`, {run.get('evaluated_queries')} judged queries)",
        f"- code: `{run.get('code_version')}`",
        f"- outputs: `{run.get('output_uri')}`",
    ]
    for c in comparisons:
        ref = f"`{c.reference_run_id}`" if c.reference_run_id else (baseline.label if baseline and c.label == "baseline" else "–")
        out.append(f"- {c.label}: {ref}")
    out.append("")
    out += metrics_table(metrics, comparisons)
    out.append("")
    if regressions:
        out += ["## Regressions", ""] + [f"- {line}" for line in regressions] + [""]
    for c in comparisons:
        if c.changed_fields:
            out += [f"## Changed since {c.label}", ""]
            for name, (before, after) in c.changed_fields.items():
                out.append(f"- {name}: `{before}` → `{after}`")
            out.append("")
    if warnings:
        out += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    if counts:
        keep = {k: v for k, v in counts.items() if not k.endswith("_examples")}
        out += ["## Counts", ""] + [f"- {k}: {v}" for k, v in keep.items()] + [""]
    if plot_name:
        out += ["## History", "", f"![metrics over the history]({plot_name})", ""]
    return "\n".join(out)


def plot_history(history: pd.DataFrame, baseline: Baseline | None = None, measures: Sequence[str] | None = None) -> bytes:
    """PNG bytes: one panel per measure, value per run in time order, baseline dashed,
    runs where that measure regressed marked in red."""
    from matplotlib.figure import Figure

    measures = list(measures or measure_columns(history))
    n = max(len(measures), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    # A Figure without pyplot renders through Agg and leaves no global state behind.
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x = list(range(len(history)))
    labels = [str(r) for r in history["run_id"]] if len(history) else []
    # history.regression_lines() starts each line with the measure's name.
    lines_per_run = [
        (text.split("\n") if isinstance(text, str) else []) for text in history.get("regressions", [None] * len(history))
    ]
    for ax, measure in zip(axes, measures):
        values = history[measure].astype(float).to_numpy() if measure in history else []
        ax.plot(x, values, marker="o", linewidth=1.5, color="tab:blue")
        if len(values):
            bad = [i for i in x if any(line.startswith(f"{measure} ") for line in lines_per_run[i])]
            ax.scatter(bad, [values[i] for i in bad], color="tab:red", zorder=3, label="regression")
        if baseline is not None and measure in baseline.metrics:
            ax.axhline(baseline.metrics[measure], color="gray", linestyle="--", linewidth=1, label="baseline")
        ax.set_title(measure)
        ax.grid(True, alpha=0.3)
        step = max(1, len(x) // 12)  # a year of daily runs stays readable
        ax.set_xticks(x[::step])
        ax.set_xticklabels(labels[::step], rotation=45, ha="right", fontsize=7)
    for ax in axes[len(measures):]:
        ax.set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
