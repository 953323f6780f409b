"""Column names and Arrow schemas: the contracts of ../shared/docs/DESIGN.md, in one place."""

from __future__ import annotations

import re

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

# Folders and files of the embedding job's output (DESIGN.md).
PAGES_DIR = "pages"
ERRORS_DIR = "errors"
SUMMARY_FILE = "summary.json"
SUMMARIES_DIR = "summaries"  # a copy of every run's summary.json: summaries/<UTC start>-<pid>.json
PREFLIGHT_FILE = "preflight.json"  # --preflight's report: not progress, not the output lock
CONFIG_FILE = "config.json"
# Files of the scoring job's output.
RESULTS_FILE = "results.parquet"
RUN_FILE = "run.trec"
QUERY_EMBEDDINGS_FILE = "query_embeddings.parquet"

# The prompts recorded with every embeddings file (colpali-engine 0.3.x, the code ColQwen2
# v1.0 was trained with: queries have no trailing "\n").
IMAGE_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|><|endoftext|>"
)
QUERY_PREFIX = "Query: "
QUERY_AUGMENTATION = "<|endoftext|>" * 10
QUERY_PROMPT = QUERY_PREFIX + "{text}" + QUERY_AUGMENTATION

# Keys of the Parquet key-value metadata written with every embeddings file.
META_MODEL = b"vdr.model"
META_PROMPT = b"vdr.image_prompt"
META_QUERY_PROMPT = b"vdr.query_prompt"
META_MAX_VISUAL_TOKENS = b"vdr.max_visual_tokens"
META_DTYPE = b"vdr.dtype"
META_VERSION = b"vdr.version"
# Hierarchical token pooling factor of the page vectors (--pool-factor; 1 = not pooled).
# Files written before it existed lack the key: read as 1.
META_POOL_FACTOR = b"vdr.pool_factor"
# Matmul precision of the page vectors (--precision): "default" (the --dtype) or "fp8"
# (pipeline/embed/fp8.py). Files written before it existed lack the key: read as "default".
META_PRECISION = b"vdr.precision"


def page_id(doc_id: str, page_number: int) -> str:
    """``f"{doc_id}#{page_number}"``: how run files and qrels name a page."""
    return f"{doc_id}#{page_number}"


# What trec_id escapes: "%" (so that escapes can be undone) and every character Python counts
# as whitespace (str.split and str.splitlines break on all of them; trec_eval on the ASCII ones).
_TREC_ESCAPED = re.compile(r"[%\s]")


def trec_id(page_id: str) -> str:
    r"""A page_id as a TREC run or qrels file holds it: ``%`` and whitespace percent-encoded.

    TREC run and qrels lines are split on whitespace, so ``a b.pdf#1`` is written
    ``a%20b.pdf#1``; ``%`` itself is written ``%25``, so a file really named ``a%20b.pdf``
    becomes ``a%2520b.pdf#1`` and the two never collide. Each escaped character is written
    as the ``%XX`` escapes of its UTF-8 bytes (``\u3000`` -> ``%E3%80%80``); nothing else is
    touched, so ordinary ids (``/``, ``#``, non-ASCII letters) stay readable.
    :func:`from_trec_id` undoes it exactly; results.parquet keeps the exact id.

    >>> trec_id("reports/annual report 100%.pdf#2")
    'reports/annual%20report%20100%25.pdf#2'
    >>> trec_id("a%20b.pdf#1"), trec_id("日本 語.pdf#3"), trec_id("x\ty.pdf#1")
    ('a%2520b.pdf#1', '日本%20語.pdf#3', 'x%09y.pdf#1')
    """
    return _TREC_ESCAPED.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), page_id)


_PERCENT_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")


def from_trec_id(trec_page_id: str) -> str:
    """The page_id that :func:`trec_id` encoded: every ``%XX`` escape decoded (UTF-8).

    ``from_trec_id(trec_id(x)) == x`` for every string ``x``. Like
    ``urllib.parse.unquote``, it decodes any ``%XX`` (so ``%23`` gives ``#``) and leaves a
    ``%`` that starts no escape as it is (``100%.pdf`` stays ``100%.pdf``), and text that
    holds no escapes (raw spaces included) comes back unchanged. Escapes that are not UTF-8
    raise ``ValueError``.

    >>> from_trec_id("reports/annual%20report%20100%25.pdf#2")
    'reports/annual report 100%.pdf#2'
    >>> from_trec_id("a%2520b.pdf#1"), from_trec_id("a%20b.pdf#1")
    ('a%20b.pdf#1', 'a b.pdf#1')
    """
    if "%" not in trec_page_id:
        return trec_page_id

    def decode(match: re.Match) -> str:
        try:
            return bytes.fromhex(match.group().replace("%", "")).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"page id {trec_page_id!r}: escape {match.group()!r} is not UTF-8 percent-encoding"
            ) from None

    return _PERCENT_RUN.sub(decode, trec_page_id)


def generation_root(output_uri: str, generation: int = 1) -> str:
    """The folder of one generation of an embeddings output: ``OUT`` itself for generation 1
    (the DESIGN.md layout), ``OUT/generations/<n>`` for the ones ``--force-new-config`` started."""
    stripped = output_uri.rstrip("/") or output_uri
    if generation is None or int(generation) <= 1:
        return stripped
    return f"{stripped}/{GENERATIONS_DIR}/{int(generation)}"


def pages_folder(corpus_uri: str, generation: int = 1) -> str:
    """``CORPUS`` or ``CORPUS/pages`` -> the folder that holds the page Parquet files (of
    ``generation``: 1 is ``CORPUS/pages``, n > 1 ``CORPUS/generations/<n>/pages``; the
    current one is named by ``CORPUS/generation.json``, see
    :func:`pipeline.storage.current_generation`)."""
    stripped = corpus_uri.rstrip("/")
    if stripped.endswith("/" + PAGES_DIR) or stripped == PAGES_DIR:
        return stripped
    return f"{generation_root(stripped, generation)}/{PAGES_DIR}"


def embeddings_to_arrow(vectors: list) -> pa.Array:
    """Ragged list of (n_i, 128) float arrays -> ``list<fixed_size_list<float16,128>>``.

    Built from flat buffers (no Python loop over vectors), so it costs one copy. The float16
    values are wrapped, not converted: ``pa.array(ndarray, pa.float16())`` goes value by value
    (310 ms for one batch of 32 pages of 780 vectors, on this project's CPU machine; the
    wrap takes 0.1 ms).
    """
    import numpy as np

    lengths = np.fromiter((len(v) for v in vectors), dtype=np.int64, count=len(vectors))
    offsets = np.zeros(len(vectors) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if len(vectors) and offsets[-1] > 0:
        flat = np.concatenate([np.asarray(v, dtype=np.float16).reshape(-1) for v in vectors])
    else:
        flat = np.zeros(0, dtype=np.float16)
    values = pa.Array.from_buffers(pa.float16(), len(flat), [None, pa.py_buffer(np.ascontiguousarray(flat))])
    inner = pa.FixedSizeListArray.from_arrays(values, EMBEDDING_DIM)
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

# The version of the source file a row was made from (listing size and modification time,
# ns since the epoch; S3/GCS: LastModified). A rerun re-embeds a document whose listed version
# differs. Null in files written before versions were recorded (such rows count as unchanged).
SOURCE_SIZE = "source_size_bytes"
SOURCE_MTIME = "source_mtime_ns"
PAGES_FILE_SCHEMA = PAGES_FILE_SCHEMA.append(pa.field(SOURCE_SIZE, pa.int64())).append(pa.field(SOURCE_MTIME, pa.int64()))
ERRORS_FILE_SCHEMA = ERRORS_FILE_SCHEMA.append(pa.field(SOURCE_SIZE, pa.int64())).append(pa.field(SOURCE_MTIME, pa.int64()))
# The error row of a document whose source was deleted (its page rows are removed). Not a
# finished state: if the file appears again it is embedded again.
SOURCE_DELETED = "SourceDeleted"

# Generations (``--force-new-config``): generation 1 is OUT itself; generation n > 1 lives in
# OUT/generations/<n>/ with its own pages/, errors/, config.json and summary.json.
# OUT/generation.json names the current one (absent: 1). Readers read only one generation.
GENERATIONS_DIR = "generations"
GENERATION_FILE = "generation.json"
# A shard rewrite in progress (retiring the rows of changed or deleted documents), in the
# generation's folder: the next run completes it (pipeline.embed.plan.finish_retirement).
RETIRE_JOURNAL = "_retire.json"

# Error types after which a document is finished even though some pages have no row.
TERMINAL_PAGE_ERRORS = frozenset({"RenderTimeout", "RendererCrashed", "TooManyPages"})

# Error types that say "not done yet", not "this document is bad": object storage did not
# answer while the document was read (after the client's retries). A rerun tries the
# document again and replaces the row (pipeline.embed.plan); every other error row is final.
STORAGE_UNAVAILABLE = "StorageUnavailable"
RETRYABLE_ERRORS = frozenset({STORAGE_UNAVAILABLE})


def shard_name(keys: list[str]) -> str:
    """Deterministic file name for a set of row keys (page ids; ``doc#None`` for a document
    error): the same rows always land in the same file name, so rewriting is idempotent."""
    import hashlib

    digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"
