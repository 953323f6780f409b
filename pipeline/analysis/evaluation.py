"""The evaluation history as series of each metric over runs (regressions marked), and
per-query wins and losses between two runs."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from pipeline.evaluate.history import measure_columns


def metric_table(history: pd.DataFrame, measures: list[str] | None = None) -> pd.DataFrame:
    """run_id x measure values (runs in time order), plus ``max_visual_tokens``, ``model``
    and ``regression``; failed runs are left out."""
    ok = history[history["status"].fillna("ok") == "ok"] if "status" in history else history
    measures = measures or measure_columns(history)
    cols = [c for c in ("run_id", "max_visual_tokens", "regression") if c in ok] + measures
    return ok[cols].set_index("run_id")


def regressed(history: pd.DataFrame) -> set[tuple[str, str]]:
    """{(run_id, measure)} that a run's regression check flagged (its ``regressions`` lines
    start with the measure's name)."""
    out = set()
    for run_id, text in zip(history["run_id"], history.get("regressions", [None] * len(history))):
        for line in (text.split("\n") if isinstance(text, str) else []):
            for measure in measure_columns(history):
                if line.startswith(f"{measure} "):
                    out.add((run_id, measure))
    return out


def series(history: pd.DataFrame) -> pd.DataFrame:
    """Long form: run_id, run_time, measure, value, regressed (one row per run and measure)."""
    flagged = regressed(history)
    ok = history[history["status"].fillna("ok") == "ok"] if "status" in history else history
    rows = [{"run_id": r["run_id"], "run_time": r["run_time"], "measure": m, "value": float(r[m]),
             "regressed": (r["run_id"], m) in flagged}
            for _, r in ok.iterrows() for m in measure_columns(history) if pd.notna(r[m])]
    return pd.DataFrame(rows, columns=["run_id", "run_time", "measure", "value", "regressed"])


def wins_losses(per_query_a: pa.Table, per_query_b: pa.Table, measure: str, tie: float = 1e-9) -> pd.DataFrame:
    """Per query judged in both evaluations: ``a``, ``b``, ``delta`` = b - a and ``outcome``
    (``win`` when b is better, ``loss``, ``tie``), biggest changes first."""
    def values(t):
        f = t.to_pandas()
        f = f[f["measure"] == measure]
        return f.set_index("query_id")["value"]

    a, b = values(per_query_a), values(per_query_b)
    both = pd.DataFrame({"a": a, "b": b}).dropna()
    both["delta"] = both["b"] - both["a"]
    both["outcome"] = ["win" if d > tie else "loss" if d < -tie else "tie" for d in both["delta"]]
    both = both.reindex(both["delta"].abs().sort_values(ascending=False, kind="stable").index)
    return both.rename_axis("query_id").reset_index()


def outcome_counts(table: pd.DataFrame) -> dict[str, int]:
    return {k: int((table["outcome"] == k).sum()) for k in ("win", "loss", "tie")}
