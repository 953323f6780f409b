"""python -m pipeline.analysis.figures writes each figure as a PNG."""

from __future__ import annotations

import os

from pipeline.analysis import figures


def test_figures_script_saves_pngs(demo_run, tmp_path, capsys):
    out = tmp_path / "figs"
    assert figures.main(["--demo", demo_run["dir"], "--out", str(out), "--only", "corpus", "--only", "evaluation"]) == 0
    names = sorted(os.listdir(out))
    assert names == sorted(["corpus_histograms.png", "corpus_errors.png", "corpus_storage.png", "corpus_summaries.png",
                            "evaluation_history.png", "evaluation_wins_losses.png"])
    for n in names:
        data = (out / n).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert str(out / "corpus_histograms.png") in capsys.readouterr().out
