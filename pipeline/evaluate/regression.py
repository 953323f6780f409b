"""Comparing a run with the previous run and a pinned baseline: changes, regressions, baselines."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping, Sequence

import pandas as pd

from pipeline import storage
from pipeline.config import RegressionPolicy
from pipeline.evaluate.history import BASELINE_FILE, CHANGE_FIELDS, row_metrics, validate_run_id

# ----------------------------------------------------------------------------- comparing



@dataclass(frozen=True)
class Change:
    measure: str
    current: float
    reference: float | None
    delta: float | None  # current - reference
    threshold: float | None
    regressed: bool


@dataclass
class Comparison:
    label: str  # "previous" or "baseline"
    reference_run_id: str | None
    changes: list[Change]
    changed_fields: dict[str, tuple] = field(default_factory=dict)  # field -> (reference, current)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regressed]


def compare(
    current: Mapping[str, float],
    reference: Mapping[str, float] | None,
    policy: RegressionPolicy,
    label: str,
    reference_run_id: str | None = None,
) -> Comparison:
    """Change of each current measure against ``reference``; a measure the reference lacks
    is reported with no delta and never regresses.

    >>> p = RegressionPolicy(max_drop=0.02)
    >>> [c.regressed for c in compare({"AP": 0.50, "RR@10": 0.70}, {"AP": 0.53, "RR@10": 0.71}, p, "previous").changes]
    [True, False]
    """
    changes = []
    for measure, value in current.items():
        ref = None if reference is None else reference.get(measure)
        if ref is None or (isinstance(ref, float) and math.isnan(ref)):
            changes.append(Change(measure, float(value), None, None, policy.threshold(measure), False))
            continue
        delta = float(value) - float(ref)
        threshold = policy.threshold(measure)
        drop = -delta
        if policy.relative:
            drop = drop / abs(ref) if ref else (math.inf if drop > 0 else 0.0)
        # A tolerance far below any metric's resolution keeps float noise from tripping
        # a zero threshold.
        regressed = threshold is not None and label in policy.against and drop > threshold + 1e-12
        changes.append(Change(measure, float(value), float(ref), delta, threshold, regressed))
    return Comparison(label=label, reference_run_id=reference_run_id, changes=changes)


def previous_run(history: pd.DataFrame, run_id: str, run_time: datetime | None = None) -> dict | None:
    """The latest row before ``run_time`` other than ``run_id`` itself, or None."""
    if history.empty:
        return None
    others = history[history["run_id"] != run_id]
    if "status" in others:  # a failed run has no metrics to compare with
        others = others[others["status"].fillna("ok") != "failed"]
    if run_time is not None:
        others = others[others["run_time"] <= pd.Timestamp(run_time)]
    if others.empty:
        return None
    return others.iloc[-1].to_dict()


def changed_fields(reference: Mapping | None, current: Mapping) -> dict[str, tuple]:
    """Provenance fields (model, token budget, corpus, qrels, code) that differ."""
    if reference is None:
        return {}
    out = {}
    for name in CHANGE_FIELDS:
        a, b = reference.get(name), current.get(name)
        if _is_missing(a) and _is_missing(b):
            continue
        if a != b:
            out[name] = (None if _is_missing(a) else a, None if _is_missing(b) else b)
    return out


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


# ----------------------------------------------------------------------------- baseline


@dataclass(frozen=True)
class Baseline:
    label: str  # what it is, for the report: "run 2026-11-01", "metrics.json at URI", "inline"
    metrics: dict[str, float]
    run_id: str | None = None
    row: dict | None = None


def pin_baseline(history_uri: str, run_id: str, endpoint_url: str | None = None) -> str:
    """Make ``run_id`` the baseline that later runs compare with (``HISTORY/baseline.json``)."""
    uri = storage.join_uri(history_uri, BASELINE_FILE)
    storage.write_json(
        uri, {"run_id": validate_run_id(run_id), "pinned_at": datetime.now(timezone.utc).isoformat()}, endpoint_url
    )
    return uri


def pinned_baseline_id(history_uri: str, endpoint_url: str | None = None) -> str | None:
    uri = storage.join_uri(history_uri, BASELINE_FILE)
    try:
        return json.loads(storage.read_bytes(uri, endpoint_url))["run_id"]
    except (FileNotFoundError, OSError):
        return None


def resolve_baseline(
    spec, history: pd.DataFrame, history_uri: str | None = None, endpoint_url: str | None = None
) -> tuple[Baseline | None, str | None]:
    """(baseline, problem). ``spec`` is a run id in the history, a URI of a metrics.json, a
    mapping of measure -> value, or None (then ``HISTORY/baseline.json``, if pinned)."""
    if spec is None and history_uri is not None:
        spec = pinned_baseline_id(history_uri, endpoint_url)
    if spec is None:
        return None, None
    if isinstance(spec, Mapping):
        if "run_id" in spec:
            spec = spec["run_id"]
        else:
            return Baseline(label="values in the config", metrics={k: float(v) for k, v in spec.items()}), None
    spec = str(spec)
    if spec.endswith(".json") or "/" in spec:
        try:
            values = json.loads(storage.read_bytes(spec, endpoint_url))
        except (FileNotFoundError, OSError) as exc:
            return None, f"baseline metrics {spec} could not be read ({exc})"
        metrics = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return Baseline(label=f"metrics at {spec}", metrics=metrics), None
    rows = history[history["run_id"] == spec] if not history.empty else history
    if rows.empty:
        return None, f"baseline run {spec!r} is not in the history"
    row = rows.iloc[-1].to_dict()
    if row.get("status") == "failed" or not row_metrics(row):
        # nothing to compare against: said, not reported as "no regression" against nulls
        return None, f"baseline run {spec!r} has no metrics (its status: {row.get('status') or 'unknown'}); pin another"
    return Baseline(label=f"run {spec}", metrics=row_metrics(row), run_id=spec, row=row), None


def regression_lines(comparisons: Sequence[Comparison]) -> list[str]:
    """One line per regression: ``nDCG@10 0.512 vs previous 0.540 (run X): -0.028 > 0.010``."""
    lines = []
    for comparison in comparisons:
        for c in comparison.regressions:
            ref = f" ({comparison.reference_run_id})" if comparison.reference_run_id else ""
            lines.append(
                f"{c.measure} {c.current:.4f} vs {comparison.label} {c.reference:.4f}{ref}: "
                f"{c.delta:+.4f}, allowed drop {c.threshold:g}"
            )
    return lines

