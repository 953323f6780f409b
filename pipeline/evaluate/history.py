"""Evaluation history: one Parquet row per run, comparison with the previous run and a
pinned baseline (comparison and regressions: :mod:`pipeline.evaluate.regression`).

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
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import pipeline
from pipeline import schema, storage
from pipeline.evaluate.runs import IRM_DOC, IRM_QUERY, IRM_RELEVANCE

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
    # "ok", or "failed" for a run that ended in an error (``error`` says which); rows written
    # before this column existed read as null, i.e. ok.
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
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
    folder = storage.corpus_pages_folder(corpus_uri, endpoint_url)  # the current generation
    fs, files = storage.list_files(folder, endpoint_url, recursive=True)
    _, root = storage.open_filesystem(folder, endpoint_url)
    root = root.rstrip("/") + "/"
    digest = hashlib.sha256()
    pages, total, first_meta = 0, 0, None
    for info, meta in zip(files, storage.read_footers(fs, [i.path for i in files])):
        relative = info.path[len(root):] if info.path.startswith(root) else info.base_name
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
        zip(qrels[IRM_QUERY], qrels[IRM_DOC], qrels[IRM_RELEVANCE].astype(int))
    )
    digest = hashlib.sha256()
    for q, d, r in rows:
        digest.update(f"{q}\t{d}\t{r}\n".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- table


def runs_folder(history_uri: str) -> str:
    return storage.join_uri(history_uri, RUNS_FOLDER)


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
    uri = storage.join_uri(runs_folder(history_uri), f"{validate_run_id(row['run_id'])}.parquet")
    storage.write_parquet(uri, _row_table(row), endpoint_url)
    return uri


def read_history(history_uri: str, endpoint_url: str | None = None) -> pd.DataFrame:
    """Every run row, oldest first. Empty (with the fixed columns) when there is no history.

    Files are read one by one and their schemas unified, so runs that computed different
    measures sit in one table (a measure a run lacks is NaN)."""
    try:
        fs, files = storage.list_files(runs_folder(history_uri), endpoint_url, recursive=True)
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
