"""Object storage: resolve a URI to a pyarrow filesystem, list documents, read bytes.

s3:// endpoints come from ``--endpoint-url`` or the standard AWS variables, including
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, which pyarrow ignores on its own.
Credentials are read by the AWS SDK from the environment and never logged or written.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs

DOCUMENT_EXTENSIONS = (".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        # A custom endpoint (MinIO, moto, Ceph) has no region to discover.
        kwargs["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        kwargs["allow_bucket_creation"] = True
    elif os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        kwargs["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return pafs.S3FileSystem(**kwargs)


def open_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (pyarrow filesystem, path inside it). Local paths, file://, s3://, gs://."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = parsed.path if scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if scheme in ("s3", "s3a"):
        return _s3(s3_endpoint(endpoint_url)), (parsed.netloc + parsed.path).rstrip("/")
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), (parsed.netloc + parsed.path).rstrip("/")
    # Anything else fsspec knows (az://, hf://, http://...), wrapped for pyarrow.
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join_uri(base: str, *parts: str) -> str:
    if "://" in base:
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(base, *parts)


@dataclasses.dataclass(frozen=True)
class DocumentRef:
    doc_id: str  # path relative to the input root, '/'-separated
    source_uri: str
    size_bytes: int


def _is_hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def list_documents(
    input_uri: str, endpoint_url: str | None = None, extensions: tuple[str, ...] | None = DOCUMENT_EXTENSIONS
) -> list[DocumentRef]:
    """Every document under ``input_uri`` (a prefix or a single file), sorted by doc_id.

    Hidden files and folders (``.x``, ``_x``) are skipped. ``extensions=None`` keeps every
    file: those that are neither PDFs nor images then end as error rows, not silently.
    """
    fs, root = open_filesystem(input_uri, endpoint_url)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--input {input_uri} does not exist (check the path, bucket and endpoint)")
    if info.type == pafs.FileType.File:
        entries, base = [info], posixpath.dirname(root)
    else:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        base = root
    prefix = input_uri.rstrip("/")
    docs = []
    for e in entries:
        if e.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(e.path, base) if base else e.path
        rel = rel.replace(os.sep, "/")
        if _is_hidden(rel):
            continue
        if extensions is not None and not rel.lower().endswith(extensions):
            continue
        source = prefix if info.type == pafs.FileType.File else f"{prefix}/{rel}"
        docs.append(DocumentRef(rel, source, int(e.size or 0)))
    docs.sort(key=lambda d: d.doc_id)
    return docs


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    fs, path = open_filesystem(uri, endpoint_url)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write a whole object so that readers see all of it or nothing.

    S3/GCS objects appear only when the upload completes; local files are written to a
    hidden temporary name in the same folder and renamed.
    """
    fs, path = open_filesystem(uri, endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
