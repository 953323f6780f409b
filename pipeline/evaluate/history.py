"""Evaluation history: one Parquet row per run, comparison with the previous run and a
pinned baseline, and regression detection.

Layout under a history URI (any filesystem)::

    HISTORY/runs/<run_id>.parquet   one file per run, one row each (the history table)
    HISTORY/baseline.json           {"run_id": ...}: the pinned baseline (optional)

One file per run keeps appends safe without locks: two runs never write the same file, a
rerun of a run id replaces its own row (idempotent), and each file appears whole (object
stores publish a PUT at once; on a local disk it is written under a temporary name and
renamed). ``HISTORY/runs/`` is an ordinary Parquet dataset; :func:`read_history` reads it
tolerating measures added over time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import pipeline
from pipeline import schema
from pipeline.evaluate import metrics as evaluate

logger = logging.getLogger(__name__)

RUNS_FOLDER = "runs"
BASELINE_FILE = "baseline.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Fixed columns of a history row; every measure adds a float64 column named as in
# ir_measures ("nDCG@10"), and ``metrics`` holds the same values as JSON.
HISTORY_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("run_time", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("model", pa.string()),
    pa.field("max_visual_tokens", pa.int32()),
    pa.field("top_k", pa.int32()),
    pa.field("corpus_uri", pa.string()),
    pa.field("corpus_fingerprint", pa.string()),
    pa.field("corpus_pages", pa.int64()),
    pa.field("queries_uri", pa.string()),
    pa.field("qrels_uri", pa.string()),
    pa.field("qrels_fingerprint", pa.string()),
    pa.field("evaluated_queries", pa.int64()),
    pa.field("code_version", pa.string()),
    pa.field("git_commit", pa.string()),
    pa.field("output_uri", pa.string()),
    pa.field("report_uri", pa.string()),
    pa.field("regression", pa.bool_()),
    pa.field("regressions", pa.string()),
    pa.field("metrics", pa.string()),
]
_FIXED = {f.name for f in HISTORY_FIELDS}

# What a reader checks first when a metric moved: these differ between two runs.
CHANGE_FIELDS = ("model", "max_visual_tokens", "top_k", "corpus_fingerprint", "qrels_fingerprint", "code_version")


def validate_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id or ""):
        raise ValueError(
            f"run id {run_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-' "
            "(it names a file in the history folder)"
        )
    return run_id


def default_run_id(now: datetime | None = None) -> str:
    """``20261122T013000Z``: sortable, unique per second."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# ----------------------------------------------------------------------------- provenance


def git_commit(repo_dir: str | None = None) -> str | None:
    """HEAD of the checkout holding this code (``+dirty`` when tracked files changed), or the
    ``VDR_GIT_COMMIT`` variable (images without .git), or None."""
    if os.environ.get("VDR_GIT_COMMIT"):
        return os.environ["VDR_GIT_COMMIT"]
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", repo_dir, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        commit = head.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo_dir, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def code_version(commit: str | None = None) -> str:
    """``0.1.0`` or ``0.1.0+g1a2b3c4d5e6f`` (PEP 440 local version with the commit)."""
    if commit:
        short = commit.split("+")[0][:12]
        return f"{pipeline.__version__}+g{short}" + (".dirty" if commit.endswith("+dirty") else "")
    return pipeline.__version__


@dataclass(frozen=True)
class CorpusInfo:
    """What identifies an embedded corpus without reading its vectors."""

    fingerprint: str
    files: int
    bytes: int
    pages: int
    metadata: dict  # the first file's vdr.* key-value metadata, decoded

    @property
    def model(self) -> str | None:
        return self.metadata.get(schema.META_MODEL.decode())

    @property
    def max_visual_tokens(self) -> int | None:
        value = self.metadata.get(schema.META_MAX_VISUAL_TOKENS.decode())
        return int(value) if value not in (None, "") else None


def corpus_info(corpus_uri: str, endpoint_url: str | None = None) -> CorpusInfo:
    """Fingerprint = sha256 over the sorted (relative name, size) of ``CORPUS/pages/*.parquet``
    and the vdr.* metadata of every file. Reads Parquet footers only, never the vectors."""
    folder = evaluate.pages_folder(corpus_uri)
    fs, files = evaluate.list_parquet_files(folder, endpoint_url)
    _, root = evaluate._open_filesystem(folder, endpoint_url)
    root = root.rstrip("/") + "/"
    digest = hashlib.sha256()
    pages, total, first_meta = 0, 0, None
    for info in files:
        relative = info.path[len(root):] if info.path.startswith(root) else info.base_name
        with fs.open_input_file(info.path) as f:
            meta = pq.read_metadata(f)
        kv = {
            k.decode(): v.decode(errors="replace")
            for k, v in (meta.metadata or {}).items()
            if k.startswith(b"vdr.")
        }
        if first_meta is None:
            first_meta = kv
        pages += meta.num_rows
        total += info.size or 0
        digest.update(json.dumps([relative, info.size, sorted(kv.items())]).encode())
        digest.update(b"\n")
    return CorpusInfo(
        fingerprint=digest.hexdigest()[:16], files=len(files), bytes=total, pages=pages, metadata=first_meta or {}
    )


def qrels_fingerprint(qrels: pd.DataFrame) -> str:
    """sha256 of the judgements, independent of their order in the file."""
    rows = sorted(
        zip(qrels[evaluate.IRM_QUERY], qrels[evaluate.IRM_DOC], qrels[evaluate.IRM_RELEVANCE].astype(int))
    )
    digest = hashlib.sha256()
    for q, d, r in rows:
        digest.update(f"{q}\t{d}\t{r}\n".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- table


def runs_folder(history_uri: str) -> str:
    return evaluate.join_uri(history_uri, RUNS_FOLDER)


def history_row(
    run_id: str,
    metrics: Mapping[str, float],
    run_time: datetime | None = None,
    **fields,
) -> dict:
    """A history row as a dict; unknown keys are refused so typos do not vanish."""
    unknown = set(fields) - _FIXED
    if unknown:
        raise ValueError(f"unknown history fields {sorted(unknown)}; known: {sorted(_FIXED)}")
    clash = set(metrics) & _FIXED
    if clash:
        raise ValueError(f"measure names {sorted(clash)} clash with history columns")
    row = {f.name: None for f in HISTORY_FIELDS}
    row.update(fields)
    row["run_id"] = validate_run_id(run_id)
    row["run_time"] = (run_time or datetime.now(timezone.utc)).astimezone(timezone.utc)
    row["metrics"] = json.dumps({k: float(v) for k, v in metrics.items()})
    row["regression"] = bool(row["regression"]) if row["regression"] is not None else False
    for name, value in metrics.items():
        row[name] = float(value)
    return row


def _row_table(row: dict) -> pa.Table:
    measures = [k for k in row if k not in _FIXED]
    fields = list(HISTORY_FIELDS) + [pa.field(m, pa.float64()) for m in measures]
    return pa.Table.from_pylist([row], schema=pa.schema(fields))


def append_run(history_uri: str, row: dict, endpoint_url: str | None = None) -> str:
    """Write ``row`` as ``HISTORY/runs/<run_id>.parquet``; returns that URI. Re-running a run id
    replaces its row instead of adding a second one."""
    uri = evaluate.join_uri(runs_folder(history_uri), f"{validate_run_id(row['run_id'])}.parquet")
    evaluate.write_parquet(uri, _row_table(row), endpoint_url)
    return uri


def read_history(history_uri: str, endpoint_url: str | None = None) -> pd.DataFrame:
    """Every run row, oldest first. Empty (with the fixed columns) when there is no history.

    Files are read one by one and their schemas unified, so runs that computed different
    measures sit in one table (a measure a run lacks is NaN)."""
    try:
        fs, files = evaluate.list_parquet_files(runs_folder(history_uri), endpoint_url)
    except FileNotFoundError:
        files = []
    tables = []
    for info in files:
        with fs.open_input_file(info.path) as f:
            tables.append(pq.read_table(f))
    if not tables:
        return pa.schema(HISTORY_FIELDS).empty_table().to_pandas()
    table = pa.concat_tables(tables, promote_options="default")
    frame = table.to_pandas()
    return frame.sort_values(["run_time", "run_id"], kind="stable").reset_index(drop=True)


def measure_columns(history: pd.DataFrame) -> list[str]:
    """Measure columns of a history frame, in first-seen order."""
    return [c for c in history.columns if c not in _FIXED]


def row_metrics(row: Mapping) -> dict[str, float]:
    value = row.get("metrics")
    if isinstance(value, str) and value:
        return {k: float(v) for k, v in json.loads(value).items()}
    return {}


# ----------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class RegressionPolicy:
    """When a drop is a regression.

    ``max_drop`` applies to every measure in ``measures`` (default: all measures computed)
    unless ``per_measure`` names its own; with ``relative`` the drop is a fraction of the
    reference value (0.05 = 5 %), otherwise absolute (0.01 = one point of nDCG).
    ``against`` says which references gate the exit status.
    """

    max_drop: float = 0.01
    per_measure: Mapping[str, float] = field(default_factory=dict)
    relative: bool = False
    measures: tuple[str, ...] | None = None
    against: tuple[str, ...] = ("previous", "baseline")

    def __post_init__(self):
        for name, value in [("max_drop", self.max_drop), *self.per_measure.items()]:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or math.isnan(value):
                raise ValueError(f"regression threshold {name}={value!r} must be a number >= 0")
        bad = set(self.against) - {"previous", "baseline"}
        if bad:
            raise ValueError(f"regression.against accepts 'previous' and 'baseline', not {sorted(bad)}")
        if self.measures is not None:
            object.__setattr__(self, "measures", tuple(self.measures))
        object.__setattr__(self, "against", tuple(self.against))
        object.__setattr__(self, "per_measure", dict(self.per_measure))

    @classmethod
    def from_mapping(cls, value: Mapping | None) -> "RegressionPolicy":
        value = dict(value or {})
        known = {"max_drop", "per_measure", "relative", "measures", "against"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown regression settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**value)

    def threshold(self, measure: str) -> float | None:
        """Allowed drop for ``measure``; None when the measure does not gate."""
        if measure in self.per_measure:
            return float(self.per_measure[measure])
        if self.measures is not None and measure not in self.measures:
            return None
        return float(self.max_drop)


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
    uri = evaluate.join_uri(history_uri, BASELINE_FILE)
    evaluate.write_json(
        uri, {"run_id": validate_run_id(run_id), "pinned_at": datetime.now(timezone.utc).isoformat()}, endpoint_url
    )
    return uri


def pinned_baseline_id(history_uri: str, endpoint_url: str | None = None) -> str | None:
    uri = evaluate.join_uri(history_uri, BASELINE_FILE)
    try:
        return json.loads(evaluate.read_bytes(uri, endpoint_url))["run_id"]
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
            values = json.loads(evaluate.read_bytes(spec, endpoint_url))
        except (FileNotFoundError, OSError) as exc:
            return None, f"baseline metrics {spec} could not be read ({exc})"
        metrics = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return Baseline(label=f"metrics at {spec}", metrics=metrics), None
    rows = history[history["run_id"] == spec] if not history.empty else history
    if rows.empty:
        return None, f"baseline run {spec!r} is not in the history"
    row = rows.iloc[-1].to_dict()
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
