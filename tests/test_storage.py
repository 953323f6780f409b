"""pipeline.storage: URIs, atomic writes, listings, retried reads (local and a real S3 endpoint)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from pipeline import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reads_retry_transient_errors_but_not_missing_objects(s3):
    """A throttled or reset read is retried; a missing object fails at once with its name."""
    bucket = s3.make_bucket()
    s3.client().put_object(Bucket=bucket, Key="a.pdf", Body=b"%PDF-1.4 hello")
    assert storage.read_bytes_with_retries(f"s3://{bucket}/a.pdf", s3.endpoint_url) == b"%PDF-1.4 hello"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes_with_retries(f"s3://{bucket}/missing.pdf", s3.endpoint_url, backoff_s=0)
    # a closed port: connection refused on every attempt -> OSError naming the attempts
    with pytest.raises(OSError, match="after 2 attempts"):
        storage.read_bytes_with_retries("s3://nobucket/x.pdf", "http://127.0.0.1:9", attempts=2, backoff_s=0)


def test_atomic_parquet_and_listing_skip_hidden_files(tmp_path):
    """Files are written whole under a temporary name and renamed; listings leave hidden
    and temporary names out, so a reader never sees a half-written file."""
    folder = tmp_path / "out"
    t = pa.table({"a": [1, 2, 3]})
    storage.write_parquet(str(folder / "b.parquet"), t)
    storage.write_parquet(str(folder / "a.parquet"), t)
    (folder / ".tmp-1-c.parquet").write_bytes(b"partial")
    (folder / "_SUCCESS.parquet").write_bytes(b"")
    _, files = storage.list_files(str(folder))
    assert [f.base_name for f in files] == ["a.parquet", "b.parquet"]
    assert storage.read_columns(str(folder), ["a", "missing"]).column("a").to_pylist() == [1, 2, 3, 1, 2, 3]
    assert storage.read_columns(str(tmp_path / "nothing"), ["a"]) is None
    # recursive listings leave out what lies in hidden folders too (the scoring job's _cache
    # beside a corpus file was counted as pages by the offline evaluation's corpus fingerprint)
    storage.write_parquet(str(folder / "_cache" / "shard-0.idx.parquet"), t)
    storage.write_parquet(str(folder / "sub" / "c.parquet"), t)
    _, deep = storage.list_files(str(folder), recursive=True)
    assert [f.path.removeprefix(str(folder) + "/") for f in deep] == ["a.parquet", "b.parquet", "sub/c.parquet"]
    os.remove(folder / "sub" / "c.parquet")
    os.remove(folder / "_cache" / "shard-0.idx.parquet")
    assert storage.delete_files(str(folder)) == 2
    assert not any(p.name.endswith(".parquet") and not p.name.startswith((".", "_")) for p in folder.iterdir())


def test_a_failed_local_write_leaves_neither_the_file_nor_a_temporary_one(tmp_path):
    class Unreadable:  # fails after the first buffer is written, as a full disk would
        def __buffer__(self, flags):
            raise OSError(28, "No space left on device")

    target = str(tmp_path / "blocks.bin")
    with pytest.raises((OSError, TypeError)):
        storage.write_buffers_atomic(target, [b"first part", Unreadable()])
    assert os.listdir(tmp_path) == []
    storage.write_bytes_atomic(target, b"whole")
    storage.write_bytes_atomic(target, b"again")  # each write has a temporary name of its own
    assert os.listdir(tmp_path) == ["blocks.bin"] and (tmp_path / "blocks.bin").read_bytes() == b"again"


def test_json_and_footers_on_s3(s3):
    bucket = s3.make_bucket()
    storage.write_json(f"s3://{bucket}/x/summary.json", {"pages": 3}, s3.endpoint_url)
    assert storage.read_json(f"s3://{bucket}/x/summary.json", s3.endpoint_url) == {"pages": 3}
    for i in range(3):
        storage.write_parquet(f"s3://{bucket}/x/p{i}.parquet", pa.table({"v": list(range(i + 1))}), s3.endpoint_url)
    fs, files = storage.list_files(f"s3://{bucket}/x", s3.endpoint_url)
    footers = storage.read_footers(fs, [f.path for f in files])
    assert [m.num_rows for m in footers] == [1, 2, 3]
    assert storage.exists(f"s3://{bucket}/x/p0.parquet", s3.endpoint_url)
    assert not storage.exists(f"s3://{bucket}/x/nope.parquet", s3.endpoint_url)


def _tree(root, files):
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"%PDF-1.4 x")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_listing_pieces_add_up_to_the_whole_listing(tmp_path, s3, where):
    """The embedding job lists its input in pieces (files at the top, then each top-level
    folder) in separate plan tasks; together they must be exactly the whole listing. Names
    that begin with "_" are documents; hidden files and non-documents are counted by reason."""
    files = ["a.pdf", "z.png", "notes.txt", ".hidden.pdf", "_drafts/x.pdf", "b/1.pdf", "b/c/2.pdf",
             "b/.cache/3.pdf", "d/4.pdf", "d/e/f/5.tiff", ".git/objects/6.pdf"]
    _tree(tmp_path / "in", files)
    uri, ep = str(tmp_path / "in"), None
    if where == "s3":
        bucket = s3.make_bucket()
        s3.upload_folder(str(tmp_path / "in"), bucket, "in/")
        uri, ep = f"s3://{bucket}/in", s3.endpoint_url
    units = storage.listing_units(uri, ep)
    assert units == ["", ".git", "_drafts", "b", "d"]
    whole_skipped, piece_skipped = {}, {}
    whole = storage.list_documents_table(uri, ep, skipped=whole_skipped)
    parts = []
    for u in units:
        part_skipped: dict = {}
        parts.append(storage.list_documents_table(uri, ep, under=u, skipped=part_skipped))
        storage.merge_skipped(piece_skipped, part_skipped)
    assert pa.concat_tables(parts).sort_by("doc_id").to_pylist() == whole.to_pylist()
    assert whole.column("doc_id").to_pylist() == ["_drafts/x.pdf", "a.pdf", "b/1.pdf", "b/c/2.pdf", "d/4.pdf",
                                                  "d/e/f/5.tiff", "z.png"]
    norm = lambda s: {k: {"count": v["count"], "examples": sorted(v["examples"])} for k, v in s.items()}
    assert norm(whole_skipped) == norm(piece_skipped) == {
        "hidden": {"count": 3, "examples": [".git/objects/6.pdf", ".hidden.pdf", "b/.cache/3.pdf"]},
        "not_a_document": {"count": 1, "examples": ["notes.txt"]}}
    one = storage.list_documents_table(f"{uri}/b/c/2.pdf", ep, under="")  # a single file is its own piece
    assert one.column("doc_id").to_pylist() == ["2.pdf"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.listing_units(f"{uri}/missing", ep)


def test_read_ranges_into_local_pieces_on_threads_and_s3(tmp_path, s3, monkeypatch):
    """Byte ranges land at their own offsets, read in pieces on several threads from local
    disk (the page cache's read path) and by read_at from S3; a short file is an error."""
    import numpy as np
    import pyarrow.fs as pafs

    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.tobytes())
    ranges = [(0, 1000), (4096, 300_000), (300_001, 1 << 20)]
    monkeypatch.setattr(storage, "READ_CHUNK_BYTES", 4096 * 7)  # ~40 pieces
    for threads in (1, 4):
        out = np.zeros_like(data)
        assert storage.read_ranges_into(pafs.LocalFileSystem(), str(path), ranges, out, threads=threads) == \
            sum(b - a for a, b in ranges)
        want = np.zeros_like(data)
        for a, b in ranges:
            want[a:b] = data[a:b]
        assert np.array_equal(out, want)
    with pytest.raises(EOFError, match="missing"):
        storage.read_ranges_into(pafs.LocalFileSystem(), str(path), [(0, (1 << 20) + 10)],
                                 np.zeros((1 << 20) + 10, np.uint8), threads=4)
    bucket = s3.make_bucket()
    uri = f"s3://{bucket}/blob.bin"
    fs, key = storage.open_filesystem(uri, s3.endpoint_url)
    with fs.open_output_stream(key) as f:
        f.write(data.tobytes())
    out = np.zeros_like(data)
    storage.read_ranges_into(fs, key, ranges, out)
    assert np.array_equal(out, want)
    with pytest.raises(EOFError, match="read"):
        storage.read_ranges_into(fs, key, [(0, (1 << 20) + 10)], np.zeros((1 << 20) + 10, np.uint8))


def test_download_files_copies_every_byte_in_ranged_pieces_on_threads(tmp_path, s3, monkeypatch):
    """Files of an object store land whole at their local paths, each cut into ranged reads of
    which several run at once (a model's weights on a new node); progress reaches the total;
    an object shorter than the size it was listed with is an error, not a short file."""
    import numpy as np

    rng = np.random.default_rng(1)
    blobs = {"weights/a.safetensors": rng.integers(0, 256, 300_001, dtype=np.uint8).tobytes(),
             "config.json": b'{"x": 1}', "empty.txt": b""}
    bucket = s3.make_bucket()
    fs, root = storage.open_filesystem(f"s3://{bucket}/m", s3.endpoint_url)
    for rel, data in blobs.items():
        with fs.open_output_stream(f"{root}/{rel}") as f:
            f.write(data)
    monkeypatch.setattr(storage, "REMOTE_PIECE_BYTES", 4096 * 5)  # 15 pieces for the big file
    seen = []
    files = [(f"{root}/{rel}", len(data), str(tmp_path / "out" / rel)) for rel, data in blobs.items()]
    assert storage.download_files(fs, files, threads=4, progress=lambda d, t: seen.append((d, t))) == \
        sum(map(len, blobs.values()))
    for rel, data in blobs.items():
        assert (tmp_path / "out" / rel).read_bytes() == data
    total = sum(map(len, blobs.values()))
    assert len(seen) == 15 + 1 and max(seen) == (total, total)  # one call per piece, the empty file none
    with pytest.raises(EOFError, match="read"):
        storage.download_files(fs, [(f"{root}/config.json", 100, str(tmp_path / "short.json"))], threads=2)


def test_download_pieces_run_at_once_and_a_failure_stops_the_rest(tmp_path, s3, monkeypatch):
    """Two threads copy two pieces at the same time (each piece's progress call waits for the
    other's: one after the other, the first would wait in vain); at the first failing piece,
    the pieces not started yet never start."""
    import threading
    import time

    bucket = s3.make_bucket()
    fs, root = storage.open_filesystem(f"s3://{bucket}/m", s3.endpoint_url)
    with fs.open_output_stream(f"{root}/w.bin") as f:
        f.write(b"x" * 8192)
    monkeypatch.setattr(storage, "REMOTE_PIECE_BYTES", 4096)
    both = threading.Barrier(2)
    storage.download_files(fs, [(f"{root}/w.bin", 8192, str(tmp_path / "w.bin"))], threads=2,
                           progress=lambda done, total: both.wait(timeout=20))
    assert (tmp_path / "w.bin").read_bytes() == b"x" * 8192
    ran = []

    def piece(i):
        if i == 0:
            time.sleep(0.5)
        if i == 1:
            raise ConnectionResetError("reset")
        ran.append(i)

    with pytest.raises(ConnectionResetError):
        storage._on_threads(piece, list(range(100)), 2, "t")
    assert len(ran) < 10


def test_check_access_names_what_to_change_about_the_output(s3, tmp_path):
    """--output problems end as one line naming the URI and what to change: a file where a
    folder is meant (was FileExistsError, exit 1), a bucket that does not exist (was 'The
    specified bucket does not exist', no URI), no S3 credentials (was NoCredentialsError, exit 1)."""
    import subprocess
    import sys

    import boto3

    boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket="access-in")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(storage.StorageAccessError, match=r"--output .*a-file is a file .* name a folder"):
        storage.check_access(str(tmp_path), str(a_file), None)
    with pytest.raises(FileNotFoundError, match=r"--output s3://no-such-bucket/emb \(endpoint .*\): .*create the bucket"):
        storage.check_access(str(tmp_path), "s3://no-such-bucket/emb", s3.endpoint_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_DEFAULT_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=ROOT)
    code = ("from pipeline import storage\n"
            f"storage.check_access({str(tmp_path)!r}, 's3://access-in/emb', {s3.endpoint_url!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "StorageAccessError: cannot write to --output s3://access-in/emb" in proc.stderr
    assert "no S3 credentials were found (NoCredentialsError). Set AWS_ACCESS_KEY_ID" in proc.stderr


def test_a_listing_leaves_out_the_output_folder_inside_it(tmp_path):
    """list_documents_table(exclude=...): the job's output inside its input is not listed
    (with --all-files its config.json and shards were embedded as error rows)."""
    for name in ("a.pdf", "runs/b.pdf", "runs/emb/config.json", "runs/emb/pages/x.parquet", "runs/embx/c.pdf"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"%PDF-1.4")
    skipped: dict = {}
    table = storage.list_documents_table(str(tmp_path), None, None, skipped=skipped, exclude="runs/emb")
    assert table.column("doc_id").to_pylist() == ["a.pdf", "runs/b.pdf", "runs/embx/c.pdf"]
    assert skipped["inside_output"]["count"] == 2
