"""Similarity maps: the patch grid derived from width, height and the prompt's token counts,
checked on real job outputs and the model's own inputs; a query built from one patch's
vector lights up that patch."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import schema
from pipeline.analysis import inputs, simmap


def _unit(rng, n):
    v = rng.standard_normal((n, schema.EMBEDDING_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_query_made_of_one_patch_lights_up_that_patch():
    rng = np.random.default_rng(0)
    prefix, suffix, rows, cols = 4, 7, 5, 3  # a 84x140 px page
    page = np.concatenate([_unit(rng, prefix), _unit(rng, rows * cols), _unit(rng, suffix)])
    grid = simmap.patch_grid(width=cols * 28, height=rows * 28, n_vectors=len(page), prefix=prefix, suffix=suffix)
    assert grid == simmap.PatchGrid(rows, cols, prefix)
    patches = simmap.patch_vectors(page.astype(np.float16), grid)
    for r, c in [(0, 0), (3, 1), (4, 2)]:
        target = page[prefix + r * cols + c]  # row-major: the page's vector order
        maps = simmap.similarity_maps(target[None], patches)
        assert maps.shape == (1, rows, cols)
        br, bc, score = simmap.best_patches(maps)[0]
        assert (br, bc) == (r, c) and score == pytest.approx(1.0, abs=2e-3)
        total = simmap.maxsim_map(maps)
        assert np.unravel_index(np.argmax(total), total.shape) == (r, c) and np.count_nonzero(total) == 1
        heat = simmap.upsample(maps[0], (cols * 28, rows * 28))  # as drawn: hottest over that patch
        assert heat.shape == (rows * 28, cols * 28)
        assert heat[r * 28 + 14, c * 28 + 14] == pytest.approx(1.0, abs=0.02)
    # Two query tokens on two patches: each token finds its own.
    two = simmap.similarity_maps(np.stack([page[prefix + 1], page[prefix + 13]]), patches)
    assert [b[:2] for b in simmap.best_patches(two)] == [(0, 1), (4, 1)]


def test_grid_that_does_not_match_the_vectors_is_refused():
    with pytest.raises(simmap.NoPatchGrid, match="pooled"):
        simmap.patch_grid(width=280, height=56, n_vectors=9, prefix=4, suffix=7)
    with pytest.raises(simmap.NoPatchGrid, match="grid"):
        simmap.patch_grid(width=281, height=56, n_vectors=31, prefix=4, suffix=7)
    with pytest.raises(simmap.NoPatchGrid, match="--pool-factor 3"):
        simmap.check_poolable({"vdr.pool_factor": "3"})
    simmap.check_poolable({})  # outputs older than pooling: one vector per patch
    simmap.check_poolable({"vdr.pool_factor": "1"})


def test_prefix_count_is_where_the_model_puts_the_image_tokens(tiny_model):
    """The prompt token counts used to place vectors equal the model inputs' layout."""
    from pipeline.embed.model import build_page_inputs, load_model

    lm = load_model(tiny_model, device="cpu")
    prefix, suffix = simmap.prompt_token_counts(tiny_model)
    assert (prefix, suffix) == (len(lm.image_prefix_ids), len(lm.image_suffix_ids))
    ids = build_page_inputs([np.zeros((112, 168, 3), np.uint8)], lm)["input_ids"][0].tolist()
    image_positions = [i for i, t in enumerate(ids) if t == lm.image_token_id]
    assert image_positions == list(range(prefix, prefix + 4 * 6)) and len(ids) == prefix + 24 + suffix


def test_every_demo_page_has_an_exact_grid_and_a_map(demo_run):
    corpus = inputs.demo_paths(demo_run["dir"])["runs"][768]["corpus"]
    model = inputs.pages_metadata(corpus)["vdr.model"]
    prefix, suffix = simmap.prompt_token_counts(model)
    pages = inputs.read_pages(corpus, ["page_id", "width", "height", "n_vectors"]).to_pylist()
    for p in pages:
        grid = simmap.patch_grid(p["width"], p["height"], p["n_vectors"], prefix, suffix)
        assert grid.rows * grid.cols <= 768
    run = inputs.demo_paths(demo_run["dir"])["runs"][768]["scores"]
    m = simmap.for_page(corpus, run, "q-revenue", "reports/2023/annual.pdf#1")
    assert m["image"].shape[:2] == (m["grid"].rows * 28, m["grid"].cols * 28)  # re-rendered exactly as embedded
    assert m["maps"].shape[1:] == (m["grid"].rows, m["grid"].cols) and len(m["labels"]) == len(m["maps"]) > 0
    assert "".join(m["labels"]).replace(" ", "") in m["text"].replace(" ", "")  # the text's own tokens
    # On the real embedding too: a patch's own vector finds that patch.
    page = inputs.read_page(corpus, "reports/2023/annual.pdf#1")
    patches = simmap.patch_vectors(page["embedding"], m["grid"])
    r, c = simmap.distinct_patch(patches)
    assert simmap.best_patches(simmap.similarity_maps(patches[r, c][None], patches))[0][:2] == (r, c)
