"""History table: append, rerun, schema growth, comparison, regression rules, report."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from pipeline.devtools.judged import write_corpus
from pipeline.evaluate import history
from pipeline.evaluate import report
from pipeline.config import RegressionPolicy
from pipeline.evaluate import regression

T0 = datetime(2026, 11, 1, 6, 0, tzinfo=timezone.utc)


def _append(root, run_id, metrics, day, **fields):
    row = history.history_row(run_id, metrics, run_time=T0 + timedelta(days=day), **fields)
    return history.append_run(str(root), row)


def test_append_read_and_rerun_replaces_its_row(tmp_path):
    assert history.read_history(str(tmp_path / "h")).empty
    _append(tmp_path / "h", "r1", {"nDCG@10": 0.5, "AP": 0.4}, 0, model="m1")
    _append(tmp_path / "h", "r2", {"nDCG@10": 0.6, "AP": 0.45}, 1, model="m1")
    _append(tmp_path / "h", "r2", {"nDCG@10": 0.61, "AP": 0.46}, 1, model="m1")  # rerun of r2
    table = history.read_history(str(tmp_path / "h"))
    assert list(table.run_id) == ["r1", "r2"]
    assert list(table["nDCG@10"]) == [0.5, 0.61]
    assert json.loads(table.iloc[1]["metrics"]) == {"nDCG@10": 0.61, "AP": 0.46}
    # nothing but the two row files: no temporary leftovers
    assert sorted(os.listdir(tmp_path / "h" / "runs")) == ["r1.parquet", "r2.parquet"]


def test_runs_with_different_measures_share_one_table(tmp_path):
    _append(tmp_path, "a", {"nDCG@10": 0.5}, 0)
    _append(tmp_path, "b", {"nDCG@10": 0.6, "P@5": 0.3}, 1)
    table = history.read_history(str(tmp_path))
    assert history.measure_columns(table) == ["nDCG@10", "P@5"]
    assert pd.isna(table.iloc[0]["P@5"]) and table.iloc[1]["P@5"] == 0.3


def test_concurrent_appends_lose_nothing(tmp_path):
    threads = [
        threading.Thread(target=_append, args=(tmp_path, f"run-{i}", {"AP": i / 10}, i)) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table = history.read_history(str(tmp_path))
    assert sorted(table.run_id) == [f"run-{i}" for i in range(8)]


def test_run_ids_and_fields_are_validated(tmp_path):
    with pytest.raises(ValueError, match="run id"):
        history.history_row("../escape", {"AP": 0.1})
    with pytest.raises(ValueError, match="unknown history fields"):
        history.history_row("ok", {"AP": 0.1}, modle="typo")
    with pytest.raises(ValueError, match=">= 0"):
        RegressionPolicy(max_drop=-0.1)
    with pytest.raises(ValueError, match="unknown regression settings"):
        RegressionPolicy.from_mapping({"max_dorp": 0.1})


def test_regression_rules():
    policy = RegressionPolicy(max_drop=0.02, per_measure={"RR@10": 0.1})
    cmp = regression.compare(
        {"nDCG@10": 0.50, "AP": 0.49, "RR@10": 0.60, "R@10": 0.9}, {"nDCG@10": 0.53, "AP": 0.51, "RR@10": 0.69},
        policy, "previous", "r0",
    )
    status = {c.measure: c.regressed for c in cmp.changes}
    # -0.03 > 0.02 regresses; -0.02 is exactly the allowed drop; RR has its own 0.1; R@10 has no reference
    assert status == {"nDCG@10": True, "AP": False, "RR@10": False, "R@10": False}
    assert cmp.changes[0].delta == pytest.approx(-0.03)
    lines = regression.regression_lines([cmp])
    assert len(lines) == 1 and lines[0].startswith("nDCG@10 0.5000 vs previous 0.5300 (r0)")

    relative = RegressionPolicy(max_drop=0.05, relative=True)
    assert [c.regressed for c in regression.compare({"AP": 0.18, "B": 0.95}, {"AP": 0.2, "B": 0.99}, relative, "baseline").changes] == [True, False]
    # only gating measures and only the references named in `against`
    gated = RegressionPolicy(max_drop=0.0, measures=("AP",), against=("baseline",))
    assert not regression.compare({"AP": 0.1, "X": 0.0}, {"AP": 0.2, "X": 1.0}, gated, "previous").regressions
    assert [c.measure for c in regression.compare({"AP": 0.1, "X": 0.0}, {"AP": 0.2, "X": 1.0}, gated, "baseline").regressions] == ["AP"]
    # improvements never regress
    assert not regression.compare({"AP": 0.9}, {"AP": 0.1}, RegressionPolicy(max_drop=0.0), "previous").regressions


def test_previous_run_and_baseline_resolution(tmp_path):
    root = str(tmp_path)
    _append(tmp_path, "r1", {"AP": 0.30}, 0)
    _append(tmp_path, "r2", {"AP": 0.40}, 1)
    _append(tmp_path, "r3", {"AP": 0.35}, 2)
    table = history.read_history(root)
    assert regression.previous_run(table, "r4", T0 + timedelta(days=3))["run_id"] == "r3"
    assert regression.previous_run(table, "r3", T0 + timedelta(days=2))["run_id"] == "r2"  # not itself
    assert regression.previous_run(table, "r1", T0) is None

    assert regression.resolve_baseline(None, table, root) == (None, None)
    regression.pin_baseline(root, "r2")
    pinned, problem = regression.resolve_baseline(None, table, root)
    assert problem is None and pinned.run_id == "r2" and pinned.metrics == {"AP": 0.40}
    explicit, _ = regression.resolve_baseline("r1", table, root)
    assert explicit.metrics == {"AP": 0.30}
    (tmp_path / "gold.json").write_text(json.dumps({"AP": 0.5, "nDCG@10": 0.6}))
    from_file, _ = regression.resolve_baseline(str(tmp_path / "gold.json"), table, root)
    assert from_file.metrics == {"AP": 0.5, "nDCG@10": 0.6}
    inline, _ = regression.resolve_baseline({"AP": 0.25}, table, root)
    assert inline.metrics == {"AP": 0.25}
    missing, problem = regression.resolve_baseline("nope", table, root)
    assert missing is None and "not in the history" in problem
    # a failed run is no baseline: said, where every delta was null and "no regression" reported
    _append(tmp_path, "r4", {}, 3, status="failed", error="FAILED run r4: boom")
    failed, problem = regression.resolve_baseline("r4", history.read_history(root), root)
    assert failed is None and "baseline run 'r4' has no metrics (its status: failed)" in problem


def test_corpus_fingerprint_tracks_files_and_model(tmp_path):
    write_corpus(tmp_path / "a", seed=0)
    write_corpus(tmp_path / "b", seed=0)
    write_corpus(tmp_path / "c", seed=0, model="other/model")
    a, b, c = (history.corpus_info(str(tmp_path / x)) for x in "abc")
    assert a.fingerprint == b.fingerprint  # same names, sizes and metadata
    assert a.fingerprint != c.fingerprint
    assert (a.pages, a.files, a.model, a.max_visual_tokens) == (12, 1, "tiny/colqwen2", 768)
    assert history.corpus_info(str(tmp_path / "a" / "pages")).fingerprint == a.fingerprint
    write_corpus(tmp_path / "a", n_docs=7, seed=0)  # one more document
    assert history.corpus_info(str(tmp_path / "a")).fingerprint != b.fingerprint


def test_code_version_has_package_version_and_commit(monkeypatch):
    import pipeline

    monkeypatch.setenv("VDR_GIT_COMMIT", "0123456789abcdef0123")
    assert history.git_commit() == "0123456789abcdef0123"
    assert history.code_version(history.git_commit()) == f"{pipeline.__version__}+g0123456789ab"
    assert history.code_version(None) == pipeline.__version__


def test_report_has_table_changes_and_plot(tmp_path):
    _append(tmp_path, "r1", {"nDCG@10": 0.50, "AP": 0.40}, 0, model="m1")
    _append(tmp_path, "r2", {"nDCG@10": 0.40, "AP": 0.41}, 1, model="m2", regression=True)
    table = history.read_history(str(tmp_path))
    policy = RegressionPolicy(max_drop=0.05)
    prev = regression.compare({"nDCG@10": 0.40, "AP": 0.41}, {"nDCG@10": 0.50, "AP": 0.40}, policy, "previous", "r1")
    prev.changed_fields = regression.changed_fields(table.iloc[0].to_dict(), table.iloc[1].to_dict())
    baseline = regression.Baseline(label="run r1", metrics={"nDCG@10": 0.5, "AP": 0.4}, run_id="r1")
    text = report.render_markdown(
        table.iloc[1].to_dict(), {"nDCG@10": 0.40, "AP": 0.41}, [prev], baseline,
        regression.regression_lines([prev]), ["a warning"],
    )
    assert "| `nDCG@10` | 0.4000 | 0.5000 | -0.1000 | **REGRESSION** vs previous |" in text
    assert "| `AP` | 0.4100 | 0.4000 | +0.0100 | ok |" in text
    assert "- model: `m1` → `m2`" in text
    assert "a warning" in text and "history.png" in text
    png = report.plot_history(table, baseline)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
