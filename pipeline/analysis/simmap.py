"""Similarity maps: which patch of a page each query token matches best, drawn over the page
as colpali-engine's interpretability tools draw them.

A page's vectors are the image prompt's prefix tokens, then one vector per merged 28x28 px
patch in row-major order over the page's grid (height/28 rows, width/28 columns: the
``height`` and ``width`` stored with each page are the pixels given to the model), then the
prompt's suffix tokens (``pipeline.schema.IMAGE_PROMPT``). The grid is derived from those
stored columns and the prompt's token counts (from the model's tokenizer), and checked
against ``n_vectors``, so outputs of every version are readable. Pages whose vectors were
pooled (``vdr.pool_factor`` > 1) no longer have one vector per patch: no map is possible."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np

from pipeline import schema

IMAGE_TOKEN = "<|image_pad|>"  # pipeline.embed.model.IMAGE_TOKEN (not imported: that loads torch)
PATCH_PX = 28  # patch 14 px x spatial merge 2: one vector per 28x28 px of the page


class NoPatchGrid(ValueError):
    """The page's vectors cannot be placed on the page (pooled, or not this prompt's layout)."""


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    rows: int
    cols: int
    first: int  # index of the first patch vector among the page's vectors

    @property
    def n_patches(self) -> int:
        return self.rows * self.cols


@lru_cache(maxsize=8)
def _tokenizer(model: str):
    """The model's tokenizer. transformers imports ``tqdm.auto``, which in a notebook without
    ipywidgets prints a TqdmWarning ("IProgress not found") under the cell: nothing here
    shows a progress bar, so that one warning is not shown."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def prompt_token_counts(model: str) -> tuple[int, int]:
    """(prefix, suffix) token counts of the image prompt around its image tokens, with the
    tokenizer of ``model`` (a local checkpoint folder or a hub name in the local cache)."""
    tok = _tokenizer(model)
    before, after = schema.IMAGE_PROMPT.split(IMAGE_TOKEN)
    return (len(tok(before, add_special_tokens=False)["input_ids"]),
            len(tok(after, add_special_tokens=False)["input_ids"]))


def check_poolable(metadata: dict[str, str]) -> None:
    """Raise :class:`NoPatchGrid` for pooled outputs (metadata of a pages file, str keys)."""
    factor = int(metadata.get(schema.META_POOL_FACTOR.decode(), "1") or 1)
    if factor > 1:
        raise NoPatchGrid(f"these pages were embedded with --pool-factor {factor}: their vectors are merged "
                          "clusters of patches, not one per patch, so similarity maps are not possible. "
                          "Embed the pages again without --pool-factor to look at them.")


def patch_grid(width: int, height: int, n_vectors: int, prefix: int, suffix: int) -> PatchGrid:
    """The page's patch grid, checked: ``n_vectors`` must be prefix + rows*cols + suffix.

    >>> patch_grid(width=280, height=56, n_vectors=4 + 20 + 7, prefix=4, suffix=7)
    PatchGrid(rows=2, cols=10, first=4)
    """
    if width % PATCH_PX or height % PATCH_PX:
        raise NoPatchGrid(f"a {width}x{height} page is not on the model's {PATCH_PX}-px grid")
    grid = PatchGrid(height // PATCH_PX, width // PATCH_PX, prefix)
    if prefix + grid.n_patches + suffix != n_vectors:
        raise NoPatchGrid(f"a {width}x{height} page has {grid.rows}x{grid.cols} patches, so {prefix} + "
                          f"{grid.n_patches} + {suffix} vectors, but {n_vectors} are stored (pooled vectors, or "
                          "another prompt or model than the one named)")
    return grid


def patch_vectors(page_vectors: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """(rows, cols, 128) float32: the page's patch vectors on its grid."""
    v = np.asarray(page_vectors, dtype=np.float32)[grid.first: grid.first + grid.n_patches]
    return v.reshape(grid.rows, grid.cols, -1)


def similarity_maps(query_vectors: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """(n_tokens, rows, cols): each query token's dot product with each patch (colpali-engine's
    ``get_similarity_maps_from_embeddings``, one page)."""
    q = np.asarray(query_vectors, dtype=np.float32)
    return np.einsum("nk,hwk->nhw", q, patches)


def best_patches(maps: np.ndarray) -> list[tuple[int, int, float]]:
    """Per query token: (row, col, similarity) of its best-matching patch."""
    out = []
    for m in maps:
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        out.append((int(r), int(c), float(m[r, c])))
    return out


def maxsim_map(maps: np.ndarray) -> np.ndarray:
    """(rows, cols): each patch's share of the MaxSim score over patches: the sum of the
    similarities of the query tokens whose best patch it is."""
    out = np.zeros(maps.shape[1:], dtype=np.float32)
    for r, c, s in best_patches(maps):
        out[r, c] += s
    return out


def query_tokens(model: str, text: str) -> list[str]:
    """The query's tokens as the model reads them (``schema.QUERY_PROMPT``), one per vector."""
    tok = _tokenizer(model)
    ids = tok(schema.QUERY_PROMPT.format(text=text), add_special_tokens=False)["input_ids"]
    return [tok.decode([i]) for i in ids]


def text_token_indices(tokens: list[str]) -> list[int]:
    """Indices of the tokens of the query's own text: not the ``Query:`` prefix, not the
    ``<|endoftext|>`` augmentation, not blank ones."""
    prefix = schema.QUERY_PREFIX.rstrip()  # "Query:"; its space may start the first word's token
    out, seen = [], ""
    for i, t in enumerate(tokens):
        if len(seen) < len(prefix):
            seen += t
            continue
        if t.strip() and t != "<|endoftext|>":
            out.append(i)
    return out


def upsample(map2d: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map normalised to [0, 1] and resized to ``size`` (width, height) with bicubic
    interpolation, as colpali-engine's ``plot_similarity_map`` does."""
    from PIL import Image

    m = np.asarray(map2d, dtype=np.float32)
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    img = Image.fromarray((m * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def for_page(corpus_uri: str, run_uri: str, query_id: str, page_id: str, endpoint_url: str | None = None,
             text_only: bool = True) -> dict:
    """Everything a map of (query, page) needs, read from the outputs: the page re-rendered
    from its source exactly as it was embedded (``image``), its ``grid``, the query's
    ``tokens``, the per-token ``maps`` (of the text's tokens when ``text_only``), their
    ``labels`` and ``best`` patches, and ``total`` (:func:`maxsim_map` over every token)."""
    import pyarrow.compute as pc

    from pipeline.analysis import inputs, results

    meta = inputs.pages_metadata(corpus_uri, endpoint_url)
    check_poolable(meta)
    model = meta.get(schema.META_MODEL.decode())
    page = inputs.read_page(corpus_uri, page_id, endpoint_url)
    prefix, suffix = prompt_token_counts(model)
    grid = patch_grid(page[schema.WIDTH], page[schema.HEIGHT], page[schema.N_VECTORS], prefix, suffix)
    queries = inputs.read_query_embeddings(run_uri, endpoint_url)
    q = queries.filter(pc.equal(queries.column(schema.QUERY_ID), query_id))
    if q.num_rows != 1:
        raise KeyError(f"no query {query_id!r} in {run_uri}")
    qvec = schema.arrow_to_embeddings(q.column(schema.EMBEDDING))[0].astype(np.float32)
    text = q.column(schema.TEXT)[0].as_py()
    tokens = query_tokens(model, text)
    if len(tokens) != len(qvec):
        tokens = [f"t{i}" for i in range(len(qvec))]  # another tokenizer than the vectors': label by position
    maps = similarity_maps(qvec, patch_vectors(page["embedding"], grid))
    keep = text_token_indices(tokens) if text_only else list(range(len(tokens)))
    keep = keep or list(range(len(tokens)))
    budget = int(meta.get(schema.META_MAX_VISUAL_TOKENS.decode(), "768"))
    image = results.source_page_image(page[schema.SOURCE_URI], page[schema.PAGE_NUMBER], budget, endpoint_url)
    if image.shape[:2] != (page[schema.HEIGHT], page[schema.WIDTH]):
        from PIL import Image  # the source changed size since it was embedded: draw over the stored size

        image = np.asarray(Image.fromarray(image).resize((page[schema.WIDTH], page[schema.HEIGHT])))
    sub = maps[keep]
    return {"image": image, "grid": grid, "text": text, "tokens": tokens, "maps": sub,
            "labels": [tokens[i] for i in keep], "best": best_patches(sub), "total": maxsim_map(maps),
            "patch_maxsim": float(maps.reshape(len(maps), -1).max(axis=1).sum())}  # patches only


def distinct_patch(patches: np.ndarray) -> tuple[int, int]:
    """(row, col) of the patch least like any other (lowest best similarity to another
    patch): a query made of its vector must light up that patch alone."""
    flat = patches.reshape(-1, patches.shape[-1]).astype(np.float32)
    sims = flat @ flat.T
    np.fill_diagonal(sims, -np.inf)
    i = int(np.argmin(sims.max(axis=1)))
    return divmod(i, patches.shape[1])
