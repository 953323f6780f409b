"""pipeline.score.queries: the four formats, ids kept as strings, clear errors, S3."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.score.queries import QueryFileError, read_queries

TEXTS = ["what is the revenue, in 2023?", "日本語の表 🙂", 'a "quoted" word', "ümlaut\ttab"]
IDS = ["007", "q2", "ü-3", "4"]


def _jsonl(path, ids=IDS, texts=TEXTS):
    path.write_text("".join(json.dumps({"query_id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in zip(ids, texts)),
                    encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_formats_read_the_same(tmp_path, fmt):
    texts = TEXTS if fmt != "tsv" else [t.replace("\t", " ") for t in TEXTS]
    path = tmp_path / f"q.{fmt}"
    if fmt == "jsonl":
        _jsonl(path, texts=texts)
    elif fmt == "csv":
        rows = ['"' + t.replace('"', '""') + '"' for t in texts]
        path.write_text("query_id,text\n" + "".join(f"{i},{r}\n" for i, r in zip(IDS, rows)), encoding="utf-8")
    elif fmt == "tsv":
        path.write_text("query_id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in zip(IDS, texts)), encoding="utf-8")
    else:
        pq.write_table(pa.table({"text": texts, "query_id": IDS, "extra": [1, 2, 3, 4]}), path)
    table = read_queries(str(path))
    assert table.column_names == ["query_id", "text"]
    assert table.column("query_id").to_pylist() == IDS  # "007" stays a string, file order kept
    assert table.column("text").to_pylist() == texts


def test_integer_ids_become_strings(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"query_id": 1, "text": "a"}\n\n{"query_id": 2, "text": "b"}\n')
    assert read_queries(str(p)).column("query_id").to_pylist() == ["1", "2"]
    pq.write_table(pa.table({"query_id": [5, 6], "text": ["a", "b"]}), tmp_path / "q.parquet")
    assert read_queries(str(tmp_path / "q.parquet")).column("query_id").to_pylist() == ["5", "6"]


def test_duplicate_ids_are_named(tmp_path):
    with pytest.raises(QueryFileError, match=r"duplicate query_id.*'q2'.*must appear once"):
        read_queries(_jsonl(tmp_path / "q.jsonl", ids=["q1", "q2", "q2", "q3"]))


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_ids_are_refused_with_row(tmp_path, bad):
    with pytest.raises(QueryFileError, match=r"empty query_id \(row\(s\) 2\)"):
        read_queries(_jsonl(tmp_path / "q.jsonl", ids=["q1", bad, "q3", "q4"]))


def test_empty_csv_id_is_refused(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text("query_id,text\nq1,a\n,b\n")
    with pytest.raises(QueryFileError, match="empty query_id"):
        read_queries(str(p))


def test_other_problems_say_what_to_fix(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text("id,question\n1,a\n")
    with pytest.raises(QueryFileError, match="missing column.*query_id.*Name the columns"):
        read_queries(str(p))
    with pytest.raises(QueryFileError, match="whitespace"):
        read_queries(_jsonl(tmp_path / "w.jsonl", ids=["q 1", "q2", "q3", "q4"]))
    p = tmp_path / "bad.jsonl"
    p.write_text('{"query_id": "a", "text": "x"}\nnot json\n')
    with pytest.raises(QueryFileError, match="line 2 is not valid JSON"):
        read_queries(str(p))
    with pytest.raises(QueryFileError, match="use one of"):
        read_queries(str(tmp_path / "q.txt"))
    with pytest.raises(QueryFileError, match="not found"):
        read_queries(str(tmp_path / "missing.jsonl"))


def test_read_from_s3(s3, tmp_path):
    import boto3

    s3.make_bucket("queries-bucket")
    body = open(_jsonl(tmp_path / "q.jsonl"), "rb").read()
    boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1").put_object(
        Bucket="queries-bucket", Key="sets/q.jsonl", Body=body)
    table = read_queries("s3://queries-bucket/sets/q.jsonl", endpoint_url=s3.endpoint_url)
    assert table.column("query_id").to_pylist() == IDS


def test_a_boolean_id_is_refused_by_name(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"query_id": true, "text": "x"}\n')
    with pytest.raises(QueryFileError, match="query_id must be a string or an integer, got True"):
        read_queries(str(path))


def test_reused_embeddings_with_a_repeated_id_are_refused(tmp_path):
    import numpy as np

    from pipeline.devtools.synthetic import write_query_embeddings
    from pipeline.score.queries import read_query_embeddings

    vectors = [np.ones((2, 128), np.float32), np.zeros((3, 128), np.float32)]
    path = write_query_embeddings(tmp_path / "qe.parquet", ["q1", "q1"], vectors, texts=["a", "a"])
    queries = read_queries(_jsonl(tmp_path / "q.jsonl", ids=["q1"]))
    with pytest.raises(QueryFileError, match="holds query id 'q1' more than once"):
        read_query_embeddings(path, None, queries)
