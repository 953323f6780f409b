"""Column names and Arrow schemas: the contracts of ../shared/docs/DESIGN.md, in one place."""

from __future__ import annotations

import pyarrow as pa

EMBEDDING_DIM = 128

# list<fixed_size_list<float16, 128>>: each row holds its page's (or query's) real vectors only.
EMBEDDING_TYPE = pa.list_(pa.list_(pa.float16(), EMBEDDING_DIM))

DOC_ID = "doc_id"
PAGE_NUMBER = "page_number"
PAGE_ID = "page_id"
SOURCE_URI = "source_uri"
WIDTH = "width"
HEIGHT = "height"
N_VECTORS = "n_vectors"
EMBEDDING = "embedding"
STAGE = "stage"
ERROR_TYPE = "error_type"
MESSAGE = "message"
QUERY_ID = "query_id"
TEXT = "text"
RANK = "rank"
SCORE = "score"

PAGES_SCHEMA = pa.schema(
    [
        pa.field(DOC_ID, pa.string(), nullable=False),
        pa.field(PAGE_NUMBER, pa.int32(), nullable=False),
        pa.field(PAGE_ID, pa.string(), nullable=False),
        pa.field(SOURCE_URI, pa.string(), nullable=False),
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        pa.field(N_VECTORS, pa.int32(), nullable=False),
        pa.field(EMBEDDING, EMBEDDING_TYPE, nullable=False),
    ]
)

# One row per document (or page) that produced no embedding. page_number is null for a
# whole-document failure.
ERRORS_SCHEMA = pa.schema(
    [
        pa.field(DOC_ID, pa.string(), nullable=False),
        pa.field(SOURCE_URI, pa.string(), nullable=False),
        pa.field(PAGE_NUMBER, pa.int32()),
        pa.field(STAGE, pa.string(), nullable=False),
        pa.field(ERROR_TYPE, pa.string(), nullable=False),
        pa.field(MESSAGE, pa.string(), nullable=False),
    ]
)

QUERY_EMBEDDINGS_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(TEXT, pa.string(), nullable=False),
        pa.field(N_VECTORS, pa.int32(), nullable=False),
        pa.field(EMBEDDING, EMBEDDING_TYPE, nullable=False),
    ]
)

RESULTS_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(RANK, pa.int32(), nullable=False),
        pa.field(PAGE_ID, pa.string(), nullable=False),
        pa.field(DOC_ID, pa.string(), nullable=False),
        pa.field(PAGE_NUMBER, pa.int32(), nullable=False),
        pa.field(SCORE, pa.float32(), nullable=False),
    ]
)

# Keys of the Parquet key-value metadata written with every embeddings file.
META_MODEL = b"vdr.model"
META_PROMPT = b"vdr.image_prompt"
META_QUERY_PROMPT = b"vdr.query_prompt"
META_MAX_VISUAL_TOKENS = b"vdr.max_visual_tokens"
META_DTYPE = b"vdr.dtype"
META_VERSION = b"vdr.version"


def page_id(doc_id: str, page_number: int) -> str:
    """``f"{doc_id}#{page_number}"``: how run files and qrels name a page."""
    return f"{doc_id}#{page_number}"


def embeddings_to_arrow(vectors: list) -> pa.Array:
    """Ragged list of (n_i, 128) float arrays -> ``list<fixed_size_list<float16,128>>``.

    Built from flat buffers (no Python loop over vectors), so it costs one copy.
    """
    import numpy as np

    lengths = np.fromiter((len(v) for v in vectors), dtype=np.int64, count=len(vectors))
    offsets = np.zeros(len(vectors) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if len(vectors) and offsets[-1] > 0:
        flat = np.concatenate([np.asarray(v, dtype=np.float16).reshape(-1) for v in vectors])
    else:
        flat = np.zeros(0, dtype=np.float16)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), EMBEDDING_DIM)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), inner)


def arrow_to_embeddings(column) -> list:
    """``list<fixed_size_list<float16,128>>`` column -> list of (n_i, 128) float16 arrays (views)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = column.offsets.to_numpy()
    flat = column.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, EMBEDDING_DIM)
    base = offsets[0]
    return [flat[offsets[i] - base : offsets[i + 1] - base] for i in range(len(column))]

# Extra column of the files the embedding job writes: how many pages the document has, so a
# rerun can tell a finished document from one a crash cut short. Readers may ignore it.
DOC_PAGES = "doc_pages"
PAGES_FILE_SCHEMA = PAGES_SCHEMA.append(pa.field(DOC_PAGES, pa.int32()))
ERRORS_FILE_SCHEMA = ERRORS_SCHEMA.append(pa.field(DOC_PAGES, pa.int32()))

# Error types after which a document is finished even though some pages have no row.
TERMINAL_PAGE_ERRORS = frozenset({"RenderTimeout", "RendererCrashed", "TooManyPages"})
