"""A run with other settings into an existing output is refused, naming the setting, unless
--force-new-config starts generation 2, which the scoring job then reads alone."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from jobs import embed_corpus, score_queries
from pipeline import schema
from pipeline.config import embed_config
from pipeline.embed import flow
from pipeline.embed.plan import ConfigMismatchError


def embed(inp, out, model, tokens, *extra):
    return embed_corpus.main(["--input", inp, "--output", out, "--model", model, "--max-visual-tokens", str(tokens),
                              "--batch-size", "4", *extra])


def test_other_settings_are_refused_unless_a_new_generation_is_forced(ray_session, tiny_model, shared_corpora,
                                                                      tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(os.path.join(shared_corpora, "pdfium", "bookmarks.pdf"), corpus / "a.pdf")  # 2 pages
    shutil.copy(os.path.join(shared_corpora, "pdfium", "about_blank.pdf"), corpus / "b.pdf")  # 1 page
    out = str(tmp_path / "out")
    assert embed(str(corpus), out, tiny_model, 64) == 0
    config_before = open(os.path.join(out, "config.json")).read()
    gen1_files = sorted(os.listdir(os.path.join(out, "pages")))
    capsys.readouterr()

    # The refusal comes from the checks that run before Ray starts (flow.preflight), not only after.
    def early(**options):
        return flow.preflight(embed_config({"input": str(corpus), "output": out, "model": tiny_model, **options}))

    for options in ({"max_visual_tokens": 32}, {"max_visual_tokens": 64, "dtype": "bfloat16"}):
        with pytest.raises(ConfigMismatchError, match="--force-new-config"):
            early(**options)
    early(max_visual_tokens=64)  # the same settings; the dtype "auto" is compared once the device is known
    early(max_visual_tokens=32, force_new_config=True)

    # Another token budget, dtype or model: exit 2, the differing setting named, nothing written.
    other_model = str(tmp_path / "other-model")
    shutil.copytree(tiny_model, other_model)
    for extra, named in (((), "--max-visual-tokens 32"), (("--dtype", "bfloat16"), "--dtype bfloat16")):
        tokens = 32 if not extra else 64
        assert embed(str(corpus), out, tiny_model, tokens, *extra) == 2
        err = capsys.readouterr().err
        assert named in err and "max_visual_tokens 64" in err and "--force-new-config" in err, err
        assert "generation 2" in err
    assert embed(str(corpus), out, other_model, 64) == 2
    err = capsys.readouterr().err
    assert f"--model {other_model}" in err and f"--model {tiny_model}" in err, err
    assert open(os.path.join(out, "config.json")).read() == config_before
    assert not os.path.exists(os.path.join(out, "generations"))

    # The same settings: an ordinary rerun.
    assert embed(str(corpus), out, tiny_model, 64) == 0
    assert json.load(open(os.path.join(out, "summary.json")))["documents_processed"] == 0

    # --force-new-config: generation 2 beside generation 1, which stays as it was.
    assert embed(str(corpus), out, tiny_model, 32, "--force-new-config") == 0
    gen2 = os.path.join(out, "generations", "2")
    summary = json.load(open(os.path.join(gen2, "summary.json")))
    assert summary["generation"] == 2 and summary["this_run"]["pages"] == 3
    assert json.load(open(os.path.join(out, "generation.json")))["current"] == 2
    assert json.loads(open(os.path.join(out, "config.json")).read())["max_visual_tokens"] == 64
    assert sorted(os.listdir(os.path.join(out, "pages"))) == gen1_files
    gen2_pages = pq.read_table(os.path.join(gen2, "pages"))
    assert gen2_pages.num_rows == 3
    assert pq.read_schema(os.path.join(gen2, "pages", os.listdir(os.path.join(gen2, "pages"))[0])).metadata[
        schema.META_MAX_VISUAL_TOKENS] == b"32"
    # Reruns now go to generation 2 (and its settings are the ones checked).
    assert embed(str(corpus), out, tiny_model, 32) == 0
    assert json.load(open(os.path.join(gen2, "summary.json")))["documents_processed"] == 0
    assert embed(str(corpus), out, tiny_model, 64) == 2
    assert "generation 3" in capsys.readouterr().err

    # The scoring job reads the current generation only (a mix would be refused: the files
    # disagree on the token budget), or the one --generation names.
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query_id": "q1", "text": "bookmarks"}\n')
    for extra, tokens, pages in (((), "32", 3), (("--generation", "1"), "64", 3)):
        res = str(tmp_path / f"scores-{tokens}")
        assert score_queries.main(["--corpus", out, "--queries", str(queries), "--output", res, "--top-k", "10",
                                   "--model", tiny_model, "--max-visual-tokens", tokens, *extra]) == 0
        scored = json.load(open(os.path.join(res, "summary.json")))
        assert scored["n_pages"] == pages
        assert pq.read_table(os.path.join(res, "results.parquet")).num_rows == 3
