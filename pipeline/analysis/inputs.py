"""Where the outputs are, and reading them with pyarrow: embedding outputs (pages, errors,
summaries, file footers), scoring runs (results, query embeddings) and evaluations.

Every function takes URIs (local path, ``file://``, ``s3://``, ``gs://``) through
:mod:`pipeline.storage`. The notebooks read the demo's outputs by default; environment
variables name other ones (:func:`notebook_inputs`)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline import schema, storage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_BUDGETS = (768, 256)


def demo_paths(workdir: str, budgets=DEFAULT_BUDGETS) -> dict:
    """The demo's layout under ``workdir``: one embedding, scoring run and history row per
    visual-token budget, all evaluated into one history."""
    runs = {}
    for b in budgets:
        run_id = f"tokens-{b}"
        runs[b] = {"run_id": run_id, "corpus": os.path.join(workdir, f"embeddings-{b}"),
                   "scores": os.path.join(workdir, "runs", run_id), "eval": os.path.join(workdir, "eval", run_id)}
    return {"workdir": workdir, "model": os.path.join(workdir, "tiny-colqwen2"), "corpus": os.path.join(workdir, "corpus"),
            "queries": os.path.join(workdir, "queries.jsonl"), "qrels": os.path.join(workdir, "qrels.txt"),
            "eval": os.path.join(workdir, "eval"), "history": os.path.join(workdir, "eval", "history"), "runs": runs}


def notebook_inputs(env=None) -> dict:
    """What a notebook reads: the demo's outputs (``VDR_DEMO_DIR``, default ``<repo>/demo``)
    unless a variable names another output (any URI):

    ``VDR_CORPUS`` (an embed_corpus output), ``VDR_CORPUS_B``, ``VDR_RUN_A`` / ``VDR_RUN_B``
    (score_queries outputs), ``VDR_HISTORY`` (an offline_eval history), ``VDR_EVAL_A`` /
    ``VDR_EVAL_B`` (evaluation outputs holding per_query.parquet), ``VDR_QRELS`` (the
    judgements that mark relevant hits), ``VDR_THUMBS`` (thumbnail cache folder),
    ``VDR_ENDPOINT_URL``."""
    env = os.environ if env is None else env

    def given(name: str) -> str | None:
        """A variable's URI; a relative local path is taken from the working directory, else
        from the repository root (Jupyter runs a notebook's kernel in notebooks/, so
        ``VDR_CORPUS=demo/embeddings-768`` named notebooks/demo/... and was not found)."""
        value = env.get(name) or None
        if value is None or "://" in value or os.path.isabs(value):
            return value
        for base in (os.getcwd(), REPO_ROOT):
            if os.path.exists(os.path.join(base, value)):
                return os.path.abspath(os.path.join(base, value))
        return value

    demo = given("VDR_DEMO_DIR") or os.path.join(REPO_ROOT, "demo")
    named = ("VDR_CORPUS", "VDR_CORPUS_B", "VDR_RUN_A", "VDR_RUN_B", "VDR_HISTORY", "VDR_EVAL_A", "VDR_EVAL_B")
    if not os.path.isdir(demo) and "://" not in demo and not any(env.get(k) for k in named):
        raise FileNotFoundError(f"no demo outputs at {demo}: run `python -m jobs.demo` first, or name your outputs "
                                "with VDR_CORPUS, VDR_RUN_A/VDR_RUN_B, VDR_HISTORY, ... (see the README's Notebooks)")
    d = demo_paths(demo)
    a, b = (d["runs"][x] for x in DEFAULT_BUDGETS)
    return {
        "demo": demo,
        "corpus": given("VDR_CORPUS") or a["corpus"],
        "corpus_b": given("VDR_CORPUS_B") or b["corpus"],
        "run_a": given("VDR_RUN_A") or a["scores"],
        "run_b": given("VDR_RUN_B") or b["scores"],
        "history": given("VDR_HISTORY") or d["history"],
        "eval_a": given("VDR_EVAL_A") or a["eval"],
        "eval_b": given("VDR_EVAL_B") or b["eval"],
        "qrels": given("VDR_QRELS") or d["qrels"],
        "thumbs": given("VDR_THUMBS") or os.path.join(demo, "thumbnails"),
        "endpoint_url": env.get("VDR_ENDPOINT_URL") or None,
    }


def run_names(uri_a: str, uri_b: str) -> tuple[str, str]:
    """Labels for two outputs in one figure: their folder names, with as many parent folders
    as it takes to tell them apart (``r1/scores`` and ``r2/scores``, offline_eval's layout,
    were both "scores": one figure panel, one run lost); "A: x" / "B: x" for the same place."""
    a, b = (u.rstrip("/").split("/") for u in (uri_a, uri_b))
    for n in range(1, max(len(a), len(b)) + 1):
        name_a, name_b = "/".join(a[-n:]), "/".join(b[-n:])
        if name_a != name_b:
            return name_a, name_b
    return f"A: {a[-1]}", f"B: {b[-1]}"


def qrels_or_none(inp: dict):
    """The judgements the notebooks mark hits with: ``inp["qrels"]`` read from any URI
    (``s3://``, ``file://`` too: an ``os.path.exists`` check dropped them silently), None when
    there is no such file."""
    from pipeline.analysis import results
    from pipeline.evaluate import runs

    uri = inp.get("qrels")
    if not uri or not storage.exists(uri, inp.get("endpoint_url")):
        return None
    return results.qrels_dict(runs.read_qrels(uri, inp.get("endpoint_url")))


def pages_folder(corpus_uri: str, endpoint_url: str | None = None) -> str:
    """The current generation's pages folder of an embed_corpus output."""
    return storage.corpus_pages_folder(corpus_uri, endpoint_url)


def _dataset(folder_uri: str, endpoint_url: str | None):
    fs, files = storage.list_files(folder_uri, endpoint_url)
    return pads.dataset([f.path for f in files], format="parquet", filesystem=fs)


def read_pages(corpus_uri: str, columns: list[str] | None = None, endpoint_url: str | None = None,
               filter=None) -> pa.Table:
    """The page rows (``columns``, default all: the embedding column is the large one)."""
    return _dataset(pages_folder(corpus_uri, endpoint_url), endpoint_url).to_table(columns=columns, filter=filter)


def read_page(corpus_uri: str, page_id: str, endpoint_url: str | None = None) -> dict:
    """One page row as a dict (embedding as an (n, 128) float16 array)."""
    table = read_pages(corpus_uri, endpoint_url=endpoint_url, filter=pads.field(schema.PAGE_ID) == page_id)
    if table.num_rows != 1:
        raise KeyError(f"{corpus_uri} has {table.num_rows} rows for page {page_id!r}")
    row = table.drop_columns([schema.EMBEDDING]).to_pylist()[0]
    row["embedding"] = schema.arrow_to_embeddings(table.column(schema.EMBEDDING))[0]
    return row


def read_errors(corpus_uri: str, endpoint_url: str | None = None) -> pa.Table:
    """The error rows; an empty table with the contract's columns when there are none."""
    folder = pages_folder(corpus_uri, endpoint_url).rsplit("/", 1)[0]  # the generation's root
    try:
        return _dataset(storage.join_uri(folder, schema.ERRORS_DIR), endpoint_url).to_table()
    except FileNotFoundError:
        return schema.ERRORS_SCHEMA.empty_table()


def pages_metadata(corpus_uri: str, endpoint_url: str | None = None) -> dict[str, str]:
    """The key-value metadata of the first pages file (model, prompts, budget, dtype, pooling)."""
    fs, files = storage.list_files(pages_folder(corpus_uri, endpoint_url), endpoint_url)
    if not files:
        raise FileNotFoundError(f"no pages files under {corpus_uri}")
    meta = storage.read_footers(fs, [files[0].path])[0].metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"vdr.")}


def file_stats(corpus_uri: str, endpoint_url: str | None = None) -> pa.Table:
    """One row per pages file: ``file``, ``rows``, ``file_bytes`` and the compressed bytes of
    the embedding column and of everything else (from the Parquet footers only)."""
    fs, files = storage.list_files(pages_folder(corpus_uri, endpoint_url), endpoint_url)
    footers = storage.read_footers(fs, [f.path for f in files])
    rows = []
    for info, meta in zip(files, footers):
        emb = other = 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema.split(".")[0] == schema.EMBEDDING:
                    emb += col.total_compressed_size
                else:
                    other += col.total_compressed_size
        rows.append({"file": info.base_name, "rows": meta.num_rows, "file_bytes": info.size,
                     "embedding_bytes": emb, "other_bytes": other})
    return pa.Table.from_pylist(rows, schema=pa.schema([("file", pa.string()), ("rows", pa.int64()),
                                                        ("file_bytes", pa.int64()), ("embedding_bytes", pa.int64()),
                                                        ("other_bytes", pa.int64())]))


def read_summaries(corpus_uri: str, endpoint_url: str | None = None) -> list[dict]:
    """Every embedding run's summary, oldest first: ``summaries/*.json`` (kept since this
    version), else just ``summary.json``."""
    root = corpus_uri.rstrip("/")
    out = []
    try:
        fs, files = storage.list_files(storage.join_uri(root, schema.SUMMARIES_DIR), endpoint_url, suffix=".json")
        for f in files:
            with fs.open_input_file(f.path) as fh:
                out.append(json.loads(fh.read()))
    except FileNotFoundError:
        pass
    if not out:
        try:
            out.append(storage.read_json(storage.join_uri(root, schema.SUMMARY_FILE), endpoint_url))
        except FileNotFoundError:
            pass
    return sorted(out, key=lambda s: s.get("started_at") or "")


def run_file(run_uri: str, name: str) -> str:
    return run_uri if run_uri.endswith(".parquet") else storage.join_uri(run_uri, name)


def read_results(run_uri: str, endpoint_url: str | None = None) -> pa.Table:
    """A scoring run's results.parquet (the run folder or the file)."""
    return storage.read_parquet(run_file(run_uri, schema.RESULTS_FILE), endpoint_url)


def read_query_embeddings(run_uri: str, endpoint_url: str | None = None) -> pa.Table:
    folder = run_uri.rsplit("/", 1)[0] if run_uri.endswith(".parquet") else run_uri
    return storage.read_parquet(storage.join_uri(folder, schema.QUERY_EMBEDDINGS_FILE), endpoint_url)


def read_per_query(eval_uri: str, endpoint_url: str | None = None) -> pa.Table:
    """An evaluation's per_query.parquet (query_id, measure, value)."""
    return storage.read_parquet(run_file(eval_uri, "per_query.parquet"), endpoint_url)
