"""Every URI, filesystem, listing, byte and Parquet read/write of the project (one place).

s3:// endpoints come from ``--endpoint-url`` or the standard AWS variables, including
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, which pyarrow ignores on its own.
Credentials are read by the AWS SDK from the environment and never logged or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import posixpath
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema

log = logging.getLogger(__name__)

# Their DEBUG records carry credentials: botocore logs each request's headers and canonical
# request, X-Amz-Security-Token (a session token) included. A job run with --verbose (root
# logger at DEBUG) must not write them: unless a level was set for them on purpose, they log
# from INFO up.
CREDENTIAL_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "gcsfs", "google.auth",
                      "google_auth_httplib2", "urllib3", "requests_oauthlib")
for _name in CREDENTIAL_LOGGERS:
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)

DOCUMENT_EXTENSIONS = (".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# ----------------------------------------------------------------------------- timeouts and retries
# Every request to object storage is retried by the client library itself (pyarrow's AWS SDK
# standard retry mode, botocore's "standard" mode for s3fs): throttling (503 SlowDown), 500s,
# resets and timeouts, with the SDK's exponential backoff. These settings bound how long one
# request may stall (timeout_s: connect, and no byte for that long) and how often it is tried.
# Production defaults ride out a stall of a minute or two; tests set a second or two.
DEFAULT_TIMEOUT_S = float(os.environ.get("PIPELINE_STORAGE_TIMEOUT_S", "20"))
DEFAULT_ATTEMPTS = int(os.environ.get("PIPELINE_STORAGE_ATTEMPTS", "6"))


@dataclasses.dataclass(frozen=True)
class StorageSettings:
    timeout_s: float = DEFAULT_TIMEOUT_S
    attempts: int = DEFAULT_ATTEMPTS


_settings = StorageSettings()


def configure(timeout_s: float | None = None, attempts: int | None = None) -> StorageSettings:
    """Set this process's storage timeouts and attempts (each Ray task calls it with the job's
    values: workers outlive jobs). None keeps the current value. Returns the new settings."""
    global _settings
    _settings = StorageSettings(float(timeout_s) if timeout_s is not None else _settings.timeout_s,
                                int(attempts) if attempts is not None else _settings.attempts)
    return _settings


def settings() -> StorageSettings:
    return _settings


class StorageUnavailableError(OSError):
    """Object storage did not answer (network, endpoint down, throttled, 5xx) after the
    client's own retries: not the object's fault, so worth trying again later."""


# OSErrors that say something about the object itself: final, retrying changes nothing.
_FINAL_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_FINAL_MARKERS = ("ACCESS_DENIED", "AccessDenied", "NoSuchKey", "NoSuchBucket", "InvalidObjectState")


def is_storage_failure(exc: BaseException) -> bool:
    """True for an OSError of the storage service or the network (timeout, refused connection,
    throttling, 5xx), False for a missing or forbidden object or a non-OSError."""
    if isinstance(exc, StorageUnavailableError):
        return True
    if not isinstance(exc, OSError) or isinstance(exc, _FINAL_OSERRORS):
        return False
    return not any(m in str(exc) for m in _FINAL_MARKERS)


def _where(uri: str, endpoint_url: str | None) -> str:
    if "://" not in uri or urlparse(uri).scheme.lower() == "file":
        return uri
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("s3", "s3a"):
        return f"{uri} (endpoint {s3_endpoint(endpoint_url) or 'AWS default'})"
    return uri


def storage_unavailable(uri: str, endpoint_url: str | None, exc: BaseException, what: str = "read") -> StorageUnavailableError:
    """A StorageUnavailableError naming the URI, the endpoint, the attempts and the cause."""
    cause = " ".join(str(exc).split()) or type(exc).__name__
    return StorageUnavailableError(f"could not {what} {_where(uri, endpoint_url)} after {_settings.attempts} "
                                   f"attempts (timeout {_settings.timeout_s:g} s each): {cause}")


def access_denied(exc: BaseException) -> bool:
    """Whether ``exc`` is the store refusing access (403). S3 without ``s3:ListBucket`` answers a
    missing key so too; pyarrow raises it as an OSError whose text says ``ACCESS_DENIED``."""
    text = str(exc)
    return isinstance(exc, PermissionError) or "ACCESS_DENIED" in text or "AccessDenied" in text


def read_failure(flag: str, uri: str, endpoint_url: str | None, exc: OSError) -> Exception | None:
    """What to raise for an OSError met while reading an input given as ``flag`` (e.g.
    ``--corpus``): a :class:`StorageAccessError` for a refusal (no or wrong credentials), a
    :class:`StorageUnavailableError` for storage that did not answer, both naming the URI and
    the endpoint; None for other errors (a missing object, ...), which keep their own message.
    pyarrow's own text named neither (``curlCode: 7``, ``ACCESS_DENIED during HeadObject``)."""
    text = " ".join(str(exc).split())
    if access_denied(exc):
        if urlparse(uri).scheme.lower() in ("s3", "s3a"):
            hint = ("Check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the node's "
                    "role), the endpoint (--endpoint-url, AWS_ENDPOINT_URL) and the path: without s3:ListBucket, S3 "
                    "answers a missing key with access denied too")
        elif urlparse(uri).scheme.lower() in ("gs", "gcs"):
            hint = "Check the credentials (GOOGLE_APPLICATION_CREDENTIALS) and the path"
        else:
            hint = "Check the file's permissions"
        return StorageAccessError(f"cannot read {flag} {_where(uri, endpoint_url)}: access denied ({text}). {hint}")
    if is_storage_failure(exc):
        return storage_unavailable(uri, endpoint_url, exc, f"read {flag}")
    return None


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, timeout_s: float = DEFAULT_TIMEOUT_S, attempts: int = DEFAULT_ATTEMPTS) -> pafs.S3FileSystem:
    kwargs: dict = {"connect_timeout": timeout_s, "request_timeout": timeout_s,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
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


# ----------------------------------------------------------------------------- gs://
#
# gs:// goes through gcsfs (fsspec), wrapped for pyarrow, not pyarrow's GcsFileSystem: the C++
# client's credential discovery cannot be bounded from Python (a run with no credentials
# waited 12 minutes for a metadata server, silently), it does not read STORAGE_EMULATOR_HOST,
# and it has no create-only write for the output lock. Here credentials are found once per
# process, with a time limit, and each bucket is probed once, so that a run that cannot reach
# its storage says so in seconds, naming the URI and what to set.

GCS_CREDENTIALS_TIMEOUT_S = 12.0  # google.auth.default + one token refresh
GCS_PROBE_TIMEOUT_S = 8.0  # one object listing of maxResults=1 per bucket and process
GCS_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
GCS_HOW_TO = ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run on GKE with "
              "workload identity (or on a VM with a service account), run `gcloud auth application-default "
              "login`, or set STORAGE_EMULATOR_HOST=http://HOST:PORT for a GCS emulator")


class ForeignFileError(ValueError):
    """A folder of the pipeline's outputs holds a file the pipeline did not write; the message
    names it."""


class StorageAccessError(RuntimeError):
    """Object storage cannot be used at all: no credentials, or no answer from the endpoint.
    The message names the URI and what to set; it never holds a credential."""


def gcs_emulator() -> str | None:
    """The GCS emulator endpoint from ``STORAGE_EMULATOR_HOST`` (as Google's own clients read
    it), with a scheme; None for the real service."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host or host == "default":
        return None
    return host if "://" in host else f"http://{host}"


def _gcs_credentials():
    """(credentials, project) from Google's default chain, with a token already fetched, or
    :class:`StorageAccessError` within ``GCS_CREDENTIALS_TIMEOUT_S``."""
    import google.auth
    import google.auth.exceptions
    from google.auth.transport.requests import Request

    def find():
        creds, project = google.auth.default(scopes=[GCS_SCOPE])
        creds.refresh(Request())  # a wrong key or an unreachable token endpoint fails here, not mid-run
        return creds, project

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gcs-credentials")
    future = pool.submit(find)
    pool.shutdown(wait=False)  # a hung metadata lookup must not hold the process
    try:
        return future.result(timeout=GCS_CREDENTIALS_TIMEOUT_S)
    except TimeoutError:
        raise StorageAccessError(
            f"no Google Cloud credentials within {GCS_CREDENTIALS_TIMEOUT_S:.0f} s (the metadata server "
            f"did not answer); {GCS_HOW_TO}") from None
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise StorageAccessError(f"no Google Cloud credentials found ({type(exc).__name__}); "
                                 f"{GCS_HOW_TO}") from None
    except google.auth.exceptions.GoogleAuthError as exc:
        # RefreshError / TransportError: credentials exist but give no token. The message
        # names the failure (e.g. invalid_grant), not the key.
        raise StorageAccessError(f"Google Cloud credentials were found but no access token could be "
                                 f"obtained ({type(exc).__name__}: {str(exc)[:300]}); {GCS_HOW_TO}") from None


@functools.lru_cache(maxsize=4)
def _gcsfs(emulator: str | None):
    """One gcsfs filesystem per process (and emulator setting); a failure is not cached."""
    # gcsfs >= 2026.10 otherwise first asks a gRPC control API about each bucket (zonal /
    # hierarchical namespace), which emulators cannot answer (60 s each); plain buckets do
    # not need it. Read when gcsfs is imported.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import gcsfs

    if emulator:
        # An emulator takes no credentials: never look for any (and never for a metadata server).
        return gcsfs.GCSFileSystem(token="anon", endpoint_url=emulator, use_listings_cache=False,
                                   skip_instance_cache=True)
    creds, project = _gcs_credentials()
    # Listings are not cached: other processes (Ray workers) write the folders this one lists.
    return gcsfs.GCSFileSystem(token=creds, project=project, use_listings_cache=False, skip_instance_cache=True)


@functools.lru_cache(maxsize=256)
def _gcs_probe(emulator: str | None, bucket: str) -> None:
    """One listing request on ``bucket`` (what every job needs anyway), bounded in time:
    an endpoint that does not answer, or credentials that are refused, fail here in seconds
    instead of in gcsfs's retries (up to about a minute per call). Cached on success only."""
    from fsspec.asyn import sync
    from fsspec.exceptions import FSTimeoutError

    fs = _gcsfs(emulator)
    where = emulator or "storage.googleapis.com"
    try:
        sync(fs.loop, fs._call, "GET", "b/{}/o", bucket, maxResults="1", fields="kind", json_out=True,
             timeout=GCS_PROBE_TIMEOUT_S)
    except FSTimeoutError:
        if emulator:
            raise StorageAccessError(
                f"no answer from the GCS emulator at {emulator} (STORAGE_EMULATOR_HOST) for bucket {bucket} within "
                f"{GCS_PROBE_TIMEOUT_S:.0f} s; start it, or unset STORAGE_EMULATOR_HOST to use Google Cloud "
                "Storage") from None
        raise StorageAccessError(
            f"no answer from {where} for bucket {bucket} within {GCS_PROBE_TIMEOUT_S:.0f} s; check this "
            f"machine's network access to it (firewall, proxy, private Google access)") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"bucket {bucket} does not exist at {where}") from None
    except PermissionError as exc:
        raise StorageAccessError(f"access to bucket {bucket} was refused ({type(exc).__name__}); "
                                 "the credentials need storage.objects.list/get/create/delete on it") from None
    except OSError as exc:
        if "Forbidden" in str(exc):
            raise StorageAccessError(f"access to bucket {bucket} was refused (403); the credentials need "
                                     "storage.objects.list/get/create/delete on it") from None
        raise StorageAccessError(f"bucket {bucket} at {where} cannot be listed "
                                 f"({type(exc).__name__}: {str(exc)[:300]})") from None
    except Exception as exc:  # noqa: BLE001 - gcsfs HttpError, aiohttp errors after its retries
        raise StorageAccessError(f"bucket {bucket} at {where} cannot be listed "
                                 f"({type(exc).__name__}: {str(exc)[:300]})") from None


def _gcs(uri: str) -> pafs.FileSystem:
    bucket = urlparse(uri).netloc
    if not bucket:
        raise ValueError(f"{uri}: a gs:// URI needs a bucket (gs://BUCKET/prefix)")
    emulator = gcs_emulator()
    try:
        _gcs_probe(emulator, bucket)
        return _gcs_pyfs(emulator)
    except StorageAccessError as exc:
        raise StorageAccessError(f"{uri}: {exc}") from None
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: {exc}") from None


@functools.lru_cache(maxsize=4)
def _gcs_pyfs(emulator: str | None) -> pafs.FileSystem:
    return pafs.PyFileSystem(pafs.FSSpecHandler(_gcsfs(emulator)))


def _gcsfs_of(fs: pafs.FileSystem):
    """The gcsfs filesystem behind a pyarrow filesystem of :func:`open_filesystem`, or None."""
    inner = getattr(getattr(fs, "handler", None), "fs", None)
    protocol = getattr(inner, "protocol", ())
    return inner if "gs" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,)) else None


def open_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (pyarrow filesystem, path inside it). Local paths, file://, s3://, gs://."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = parsed.path if scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if scheme in ("s3", "s3a"):
        return _s3(s3_endpoint(endpoint_url), _settings.timeout_s, _settings.attempts), (parsed.netloc + parsed.path).rstrip("/")
    if scheme in ("gs", "gcs"):
        return _gcs(uri), (parsed.netloc + parsed.path).rstrip("/")
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
    """``.x`` files or folders (``.DS_Store``, ``.git/``, uploads in progress). Names that
    begin with ``_`` are ordinary documents."""
    return any(part.startswith(".") for part in rel.split("/"))


# How many example names a listing keeps for each reason it skipped files.
SKIPPED_EXAMPLES = 3


def count_skipped(skipped: dict, reason: str, name: str) -> None:
    """``skipped[reason] = {"count": n, "examples": [up to SKIPPED_EXAMPLES names]}``."""
    entry = skipped.setdefault(reason, {"count": 0, "examples": []})
    entry["count"] += 1
    if len(entry["examples"]) < SKIPPED_EXAMPLES:
        entry["examples"].append(name)


def merge_skipped(total: dict, part: dict) -> dict:
    for reason, entry in part.items():
        t = total.setdefault(reason, {"count": 0, "examples": []})
        t["count"] += entry["count"]
        t["examples"] = sorted(t["examples"] + entry["examples"])[:SKIPPED_EXAMPLES]
    return total


DOCUMENT_LISTING_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64(), nullable=False),
    pa.field("mtime_ns", pa.int64()),  # last modification (ns since the epoch), null if unknown
])
_LISTING_CHUNK = 65_536


def listing_units(input_uri: str, endpoint_url: str | None = None) -> list[str]:
    """How a listing is cut into independent pieces: ``""`` for the files directly under the
    input folder (or the input itself when it is one file), then each top-level subfolder's
    name, sorted (hidden ones too, so that what they hold is counted as skipped). Each piece is listed by :func:`list_documents_table` with
    ``under=``; together they list exactly what the whole listing would."""
    fs, root = open_filesystem(input_uri, endpoint_url)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--input {input_uri} does not exist (check the path, bucket and endpoint)")
    if info.type == pafs.FileType.File:
        return [""]
    top = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    folders = sorted(posixpath.basename(e.path.rstrip("/")) for e in top if e.type == pafs.FileType.Directory)
    return [""] + folders


def _listing_chunks(fs: pafs.FileSystem, root: str, under: str | None = None):
    """FileInfo lists under a folder, one top-level subfolder at a time, so that no process
    holds a FileInfo object for every file of a huge corpus at once. ``under``: only the
    files directly in ``root`` (``""``) or only one top-level subfolder."""
    if under:
        yield fs.get_file_info(pafs.FileSelector(f"{root.rstrip('/')}/{under}", recursive=True))
        return
    top = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    yield [e for e in top if e.type == pafs.FileType.File]
    if under == "":
        return
    for d in sorted((e.path for e in top if e.type == pafs.FileType.Directory)):
        yield fs.get_file_info(pafs.FileSelector(d, recursive=True))


def list_documents_table(
    input_uri: str, endpoint_url: str | None = None, extensions: tuple[str, ...] | None = DOCUMENT_EXTENSIONS,
    under: str | None = None, skipped: dict | None = None, exclude: str | None = None,
) -> pa.Table:
    """Every document under ``input_uri`` (a prefix or a single file) as an Arrow table
    (doc_id, source_uri, size_bytes, mtime_ns), sorted by doc_id. Size and modification time
    are the source's version: a rerun re-embeds a document whose version changed.

    Hidden files and folders (``.x``) and files without a document extension are skipped,
    and counted by reason in ``skipped`` when given (:func:`count_skipped`).
    ``extensions=None`` keeps every visible file: those that are neither PDFs nor images
    then end as error rows, not silently.
    The listing is turned into Arrow chunk by chunk: no Python object per document stays.
    ``under`` lists one piece of :func:`listing_units` only (doc ids stay relative to the input).
    ``exclude``: a folder, relative to the input, whose files are skipped (``inside_output``):
    the job's own output when it lies inside its input.
    """
    fs, root = open_filesystem(input_uri, endpoint_url)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--input {input_uri} does not exist (check the path, bucket and endpoint)")
    prefix = input_uri.rstrip("/")
    if info.type == pafs.FileType.File:
        chunks, base, single = iter([[info]]), posixpath.dirname(root), True
    else:
        chunks, base, single = _listing_chunks(fs, root, under), root, False
    batches: list[pa.RecordBatch] = []
    ids: list[str] = []
    sources: list[str] = []
    sizes: list[int] = []
    mtimes: list[int | None] = []

    def flush() -> None:
        if ids:
            batches.append(pa.record_batch([pa.array(ids, pa.string()), pa.array(sources, pa.string()),
                                            pa.array(sizes, pa.int64()), pa.array(mtimes, pa.int64())],
                                           schema=DOCUMENT_LISTING_SCHEMA))
            ids.clear()
            sources.clear()
            sizes.clear()
            mtimes.clear()

    cut = len(base) + 1 if base else 0
    for entries in chunks:
        for e in entries:
            if e.type != pafs.FileType.File:
                continue
            path = e.path
            if base and path.startswith(base + "/"):
                rel = path[cut:]
            else:
                rel = posixpath.relpath(path, base) if base else path
            rel = rel.replace(os.sep, "/")
            if exclude and (rel == exclude or rel.startswith(exclude + "/")):
                if skipped is not None:
                    count_skipped(skipped, "inside_output", rel)
                continue
            if _is_hidden(rel):
                if skipped is not None:
                    count_skipped(skipped, "hidden", rel)
                continue
            if extensions is not None and not rel.lower().endswith(extensions):
                if skipped is not None:
                    count_skipped(skipped, "not_a_document", rel)
                continue
            ids.append(rel)
            sources.append(prefix if single else f"{prefix}/{rel}")
            sizes.append(int(e.size or 0))
            mtimes.append(e.mtime_ns)
            if len(ids) >= _LISTING_CHUNK:
                flush()
        del entries
        flush()
    table = pa.Table.from_batches(batches, schema=DOCUMENT_LISTING_SCHEMA)
    if table.num_rows > 1:
        table = table.sort_by("doc_id")
    return table.combine_chunks()


def list_documents(
    input_uri: str, endpoint_url: str | None = None, extensions: tuple[str, ...] | None = DOCUMENT_EXTENSIONS
) -> list[DocumentRef]:
    """Every document under ``input_uri`` (a prefix or a single file), sorted by doc_id, as
    Python objects: for small inputs and tests; the planner uses :func:`list_documents_table`."""
    table = list_documents_table(input_uri, endpoint_url, extensions)
    return [DocumentRef(d, s, n) for d, s, n in zip(table.column("doc_id").to_pylist(),
                                                     table.column("source_uri").to_pylist(),
                                                     table.column("size_bytes").to_pylist())]


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """The whole object at ``uri``."""
    fs, path = open_filesystem(uri, endpoint_url)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write a whole object so that readers see all of it or nothing (see
    :func:`write_buffers_atomic`)."""
    write_buffers_atomic(uri, [data], endpoint_url)


READ_CHUNK_BYTES = 64 << 20
READ_THREADS = 8
# Object stores: a model's files are copied in ranged reads of 64 MiB, several at once. moto's
# server copies the whole object for each ranged GET, so there fewer, larger pieces are faster
# (RESULTS "Twenty-first session"); S3 serves each range on its own (AWS's performance
# guidelines: byte-range GETs in parallel), which moto cannot show and these machines cannot reach.
REMOTE_PIECE_BYTES = 64 << 20


def _pieces(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    return [(a, min(stop, a + size)) for start, stop in ranges for a in range(start, stop, size)]


def _on_threads(fn, items: list, workers: int, name: str) -> None:
    """``fn`` on each item, on up to ``workers`` threads. At the first error the items not
    started yet are cancelled, the running ones finish, and that error is raised."""
    workers = max(1, min(workers, len(items)))
    if workers == 1:
        for item in items:
            fn(item)
        return
    import concurrent.futures

    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        futures = [pool.submit(fn, item) for item in items]
        done, pending = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for fut in pending:
            fut.cancel()
    for fut in futures:
        if not fut.cancelled() and fut.exception() is not None:
            raise fut.exception()


def read_ranges_into(fs: pafs.FileSystem, path: str, ranges: list[tuple[int, int]], out,
                     threads: int | None = None) -> int:
    """Copy byte ranges ``[start, stop)`` of a file into the same offsets of ``out`` (a writable
    uint8 numpy array at least as long as the file); returns the bytes read. Local files are
    read straight into ``out`` (``preadv``: no intermediate buffer), in 64 MiB pieces on up to
    ``threads`` threads (default: 8, at most the CPU count): one thread copied a page-cached
    7 GB cache file at 2.6 GB/s on the H200 host (RESULTS.md). Others are read by ``read_at``,
    one request per range (in pieces on threads it was 5.5x slower against moto's server, which
    copies the whole object for each ranged GET: RESULTS "Twenty-first session"; S3 not measured)."""
    view = memoryview(out).cast("B")
    total = sum(stop - start for start, stop in ranges)
    if isinstance(fs, pafs.LocalFileSystem):
        fd = os.open(path, os.O_RDONLY)

        def read(piece):
            pos, stop = piece
            while pos < stop:
                n = os.preadv(fd, [view[pos:stop]], pos)  # releases the GIL
                if n <= 0:
                    raise EOFError(f"{path}: {stop - pos} bytes missing at offset {pos}")
                pos += n

        try:
            _on_threads(read, _pieces(ranges, READ_CHUNK_BYTES),
                        min(threads or READ_THREADS, os.cpu_count() or 1), "read-ranges")
        finally:
            os.close(fd)
        return total
    with fs.open_input_file(path) as f:
        for start, stop in ranges:
            data = f.read_at(stop - start, start)
            if len(data) != stop - start:
                raise EOFError(f"{path}: read {len(data)} of {stop - start} bytes at offset {start}")
            view[start:stop] = memoryview(data)
    return total


def download_files(fs: pafs.FileSystem, files: list[tuple[str, int, str]], threads: int | None = None,
                   progress=None, cancel=None) -> int:
    """Copy whole files of ``fs`` to local paths: ``files`` holds (path in ``fs``, its size,
    local destination). Each file is cut into 64 MiB ranged reads, and up to ``threads``
    (default 8) of them, of any of the files, run at once, each written at its own offset.
    ``progress(bytes_done, bytes_total)`` is called after each piece (from the threads); once
    ``cancel`` (a ``threading.Event``) is set, no piece starts and ``CancelledError`` is raised.
    Memory: one piece's buffer per thread (8 x 64 MiB by default). Returns the bytes copied; a
    file shorter than its size is an error."""
    import threading

    total = sum(size for _, size, _ in files)
    done = [0]
    lock = threading.Lock()
    fds: dict[str, int] = {}
    sources: dict[str, object] = {}
    try:
        for _, size, dst in files:
            os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
            fds[dst] = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fds[dst], size)
        pieces = [(src, dst, a, b) for src, size, dst in files for a, b in _pieces([(0, size)], REMOTE_PIECE_BYTES)]

        def opened(src: str):
            with lock:
                if src not in sources:
                    sources[src] = fs.open_input_file(src)
                return sources[src]

        def copy(piece):
            src, dst, start, stop = piece
            if cancel is not None and cancel.is_set():
                from concurrent.futures import CancelledError

                raise CancelledError("the copy was cancelled")
            data = opened(src).read_at(stop - start, start)  # releases the GIL; one ranged GET
            if len(data) != stop - start:
                raise EOFError(f"{src}: read {len(data)} of {stop - start} bytes at offset {start}")
            view, pos = memoryview(data), start
            while pos < stop:
                pos += os.pwrite(fds[dst], view[pos - start:], pos)
            with lock:
                done[0] += stop - start
                now = done[0]
            if progress is not None:
                progress(now, total)

        _on_threads(copy, pieces, threads or READ_THREADS, "download")
    finally:
        for fd in fds.values():
            os.close(fd)
        for f in sources.values():
            f.close()
    return total


def file_size(uri: str, endpoint_url: str | None = None) -> int | None:
    """Size in bytes of the object at ``uri``, or None when there is none."""
    fs, path = open_filesystem(uri, endpoint_url)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def write_buffers_atomic(uri: str, buffers: list, endpoint_url: str | None = None) -> None:
    """Write the concatenation of ``buffers`` (bytes-like, e.g. numpy arrays) as one whole
    object, without concatenating them in memory, so that readers see all of it or nothing.

    S3/GCS objects appear only when the upload completes; local files are written to a
    hidden temporary name in the same folder and renamed.
    """
    fs, path = open_filesystem(uri, endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        # unique per call: writers in other pid namespaces (pods sharing a hostPath) can share a pid
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                for b in buffers:
                    f.write(memoryview(b).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk, an interrupt: no temporary file left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    if _gcsfs_of(fs) is None:  # GCS has no folders; gcsfs would check (or create) the bucket each time
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        for b in buffers:
            f.write(memoryview(b).cast("B"))


def read_bytes_with_retries(uri: str, endpoint_url: str | None = None, attempts: int | None = None,
                            backoff_s: float | None = None) -> bytes:
    """The whole object, read with the client library's retries (throttling, 5xx, resets,
    timeouts: :func:`configure`; ``attempts`` overrides the attempts for this read, the SDK
    chooses the backoff, ``backoff_s`` is ignored). A missing or forbidden object fails at
    once with its own error; a storage failure that outlasts the retries raises
    :class:`StorageUnavailableError` naming the URI, the endpoint and the cause."""
    saved = _settings
    if attempts is not None:
        configure(attempts=attempts)
    try:
        return read_bytes(uri, endpoint_url)
    except OSError as exc:
        if is_storage_failure(exc):
            raise storage_unavailable(uri, endpoint_url, exc) from exc
        raise
    finally:
        configure(saved.timeout_s, saved.attempts)


def read_json(uri: str, endpoint_url: str | None = None):
    return json.loads(read_bytes(uri, endpoint_url))


def summary_job(folder_uri: str, endpoint_url: str | None = None) -> str | None:
    """The job that wrote ``FOLDER/summary.json`` (its ``job`` key; a scoring summary written
    before it named its job, 2026-12-06, is known by ``n_results``), or None where there is no
    readable summary (none, not JSON, or not readable: S3 answers 403 for a missing key without
    ListBucket). Jobs use it to keep from writing over another job's output."""
    try:
        found = read_json(join_uri(folder_uri, "summary.json"), endpoint_url)
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict):
        return None
    return found.get("job") or ("score_queries" if "n_results" in found else None)


def write_json(uri: str, value, endpoint_url: str | None = None) -> None:
    write_bytes_atomic(uri, (json.dumps(value, indent=2, sort_keys=False, default=str) + "\n").encode(), endpoint_url)


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    fs, path = open_filesystem(uri, endpoint_url)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_access(input_uri: str, output_uri: str, endpoint_url: str | None = None, timeout_s: float = 5.0,
                 attempts: int = 2) -> dict:
    """Before any work: the input can be listed (one listing call) and the output written (a
    small hidden probe object written, then deleted), with short timeouts and few attempts.
    Raises FileNotFoundError when the input does not exist, and
    :class:`StorageUnavailableError` naming the URI and the endpoint when storage does not
    answer or refuses. Returns what was seen (for the log)."""
    import uuid

    saved = _settings
    configure(min(timeout_s, saved.timeout_s), min(attempts, saved.attempts))
    try:
        fs, root = open_filesystem(input_uri, endpoint_url)
        try:
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.Directory:
                listed = len(fs.get_file_info(pafs.FileSelector(root, recursive=False)))
            elif info.type == pafs.FileType.File:
                listed = 1
            else:
                raise FileNotFoundError(f"--input {input_uri} does not exist (check the path, bucket and endpoint"
                                        f"{'' if '://' not in input_uri else ': ' + _where(input_uri, endpoint_url)})")
        except OSError as exc:
            if not is_storage_failure(exc):
                raise
            raise storage_unavailable(input_uri, endpoint_url, exc, "list --input") from None
        probe = join_uri(output_uri, f".probe-{uuid.uuid4().hex[:12]}")
        try:
            fs_out, path = open_filesystem(probe, endpoint_url)
            if isinstance(fs_out, pafs.S3FileSystem):
                # Plain PutObject/DeleteObject (botocore, same timeouts): pyarrow's delete would
                # leave a folder marker behind, and a refused run must leave nothing.
                bucket, key = _s3_bucket_key(path)
                s3 = _s3fs(s3_endpoint(endpoint_url))
                s3.call_s3("put_object", Bucket=bucket, Key=key, Body=b"probe\n")
                s3.call_s3("delete_object", Bucket=bucket, Key=key)
            else:
                write_bytes_atomic(probe, b"probe\n", endpoint_url)
                fs_out.delete_file(path)
        except (FileExistsError, NotADirectoryError):
            raise StorageAccessError(f"--output {output_uri} is a file (or lies under one), not a folder: name a "
                                     "folder (it is created if missing)") from None
        except FileNotFoundError as exc:  # S3's NoSuchBucket
            raise FileNotFoundError(f"--output {_where(output_uri, endpoint_url)}: {' '.join(str(exc).split())} "
                                    "(create the bucket, or check its name and the endpoint)") from None
        except OSError as exc:
            if access_denied(exc):
                raise StorageUnavailableError(f"cannot write to --output {_where(output_uri, endpoint_url)}: "
                                              f"{' '.join(str(exc).split())}") from None
            if not is_storage_failure(exc):
                raise
            raise storage_unavailable(output_uri, endpoint_url, exc, "write a probe object to --output") from None
        except Exception as exc:
            if type(exc).__name__ not in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
                raise
            raise StorageAccessError(
                f"cannot write to --output {_where(output_uri, endpoint_url)}: no S3 credentials were found "
                f"({type(exc).__name__}). Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run "
                "where an instance or pod role provides them") from None
        return {"input_entries": listed}
    finally:
        configure(saved.timeout_s, saved.attempts)


# ----------------------------------------------------------------------------- Parquet

# Pages per row group: readers (the scoring job, pyarrow.dataset) decode row groups in
# parallel, and a nested list of ~100k float16 values per page decodes slowly in one thread.
ROW_GROUP_PAGES = 32


def parquet_bytes(table: pa.Table, metadata: dict[bytes, bytes] | None = None) -> bytes:
    """Parquet bytes of ``table``. No dictionary encoding: on embedding values it only costs
    (measured: reads 2.6x faster without it, files 2% larger, benchmarks/RESULTS.md)."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=False, row_group_size=ROW_GROUP_PAGES,
                   write_statistics=[c for c in table.column_names if c != schema.EMBEDDING])
    return buf.getvalue()


def write_parquet(uri: str, table: pa.Table, endpoint_url: str | None = None,
                  metadata: dict[bytes, bytes] | None = None) -> None:
    """One whole Parquet file, atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(uri, parquet_bytes(table, metadata), endpoint_url)


def read_parquet(uri: str, endpoint_url: str | None = None, columns: list[str] | None = None) -> pa.Table:
    fs, path = open_filesystem(uri, endpoint_url)
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


def list_files(folder_uri: str, endpoint_url: str | None = None, suffix: str = ".parquet",
               recursive: bool = False) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """(filesystem, visible files under a folder, sorted by path). Hidden and temporary
    names (``.x``, ``_x``: unfinished uploads, Spark markers) are left out, and with
    ``recursive`` so is everything inside such a folder (e.g. the scoring job's ``_cache``).
    Raises FileNotFoundError when the folder does not exist."""
    fs, path = open_filesystem(folder_uri, endpoint_url)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such folder: {folder_uri}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    root = path.rstrip("/") + "/"

    def visible(info: pafs.FileInfo) -> bool:
        relative = info.path[len(root):] if info.path.startswith(root) else info.base_name
        return not any(part.startswith((".", "_")) for part in relative.split("/"))

    files = [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and visible(i)]
    return fs, sorted(files, key=lambda i: i.path)


def delete_files(folder_uri: str, endpoint_url: str | None = None, suffix: str = ".parquet") -> int:
    """Delete the visible ``*suffix`` files of a folder; returns how many (0 if no folder)."""
    try:
        fs, files = list_files(folder_uri, endpoint_url, suffix)
    except FileNotFoundError:
        return 0
    for f in files:
        fs.delete_file(f.path)
    return len(files)


def read_footers(fs: pafs.FileSystem, paths: list[str]) -> list[pq.FileMetaData]:
    """Parquet footers of many files, read in parallel (on object storage each is a round trip)."""
    def footer(path):
        with fs.open_input_file(path) as f:
            try:
                return pq.read_metadata(f)
            except pa.ArrowInvalid as exc:
                raise ForeignFileError(f"{path} is not a readable Parquet file ({' '.join(str(exc).split())[:200]}); "
                                       "its folder holds files the pipeline did not write: move them out of "
                                       "it") from None

    if len(paths) <= 1:
        return [footer(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(32, len(paths))) as pool:
        return list(pool.map(footer, paths))


def read_columns(folder_uri: str, columns: list[str], endpoint_url: str | None = None,
                 types: pa.Schema | None = None) -> pa.Table | None:
    """The named columns (those present) of every visible Parquet file in a folder, or None
    when there is no such folder or file. Only those columns are read.

    ``types``: the columns' types; then every named column of it is read from every file,
    as nulls from files that lack it (files of an older version), whatever the first file holds."""
    try:
        fs, files = list_files(folder_uri, endpoint_url)
    except FileNotFoundError:
        return None
    if not files:
        return None
    try:
        if types is not None:
            fields = [pa.field(f.name, f.type) for f in types if f.name in columns]
            ds = pads.dataset([f.path for f in files], format="parquet", filesystem=fs, schema=pa.schema(fields))
        else:
            ds = pads.dataset([f.path for f in files], format="parquet", filesystem=fs)
        return ds.to_table(columns=[c for c in columns if c in ds.schema.names])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise _foreign_file(folder_uri, fs, files, exc) from None


def _foreign_file(folder_uri: str, fs, files, exc: Exception) -> ForeignFileError:
    """The error for a folder of ours that holds a file that is not one of our Parquet files:
    it names the first file whose footer or schema does not read (pyarrow's own message named
    none, e.g. 'Parquet file size is 5 bytes')."""
    bad = None
    for f in files:
        try:
            pq.read_schema(f.path, filesystem=fs)
        except Exception:  # noqa: BLE001 - this is the one
            bad = f.path
            break
    what = f"{bad} is not a readable Parquet file" if bad else "its Parquet files do not read together"
    return ForeignFileError(f"{folder_uri}: {what} ({' '.join(str(exc).split())[:200]}); it holds files the "
                            "pipeline did not write: move them out of it")


FILE_COLUMN = "_file"


def read_columns_per_file(folder_uri: str, types: pa.Schema, endpoint_url: str | None = None) -> pa.Table | None:
    """Like :func:`read_columns` with ``types`` (its columns, nulls where a file lacks one),
    plus ``_file``: the base name of the file each row is in. None when there is no file."""
    try:
        fs, files = list_files(folder_uri, endpoint_url)
    except FileNotFoundError:
        return None
    if not files:
        return None
    types = pa.schema([pa.field(f.name, f.type) for f in types])
    try:
        ds = pads.dataset([f.path for f in files], format="parquet", filesystem=fs, schema=types)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise _foreign_file(folder_uri, fs, files, exc) from None

    def read(fragment):
        t = fragment.to_table(columns=types.names, schema=types)
        return t.append_column(FILE_COLUMN, pa.array([posixpath.basename(fragment.path)] * t.num_rows, pa.string()))

    fragments = list(ds.get_fragments())
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(fragments)))) as pool:
        return pa.concat_tables(list(pool.map(read, fragments)))


def delete_file(uri: str, endpoint_url: str | None = None) -> bool:
    """Delete one object or file; False when it was already absent."""
    fs, path = open_filesystem(uri, endpoint_url)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        return False
    return True


def current_generation(output_uri: str, endpoint_url: str | None = None) -> int:
    """The generation an embeddings output's readers and reruns use: ``OUT/generation.json``'s
    ``current`` (written by ``--force-new-config``), 1 when there is no such file."""
    try:
        value = read_json(join_uri(output_uri, schema.GENERATION_FILE), endpoint_url)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return 1
    current = value.get("current") if isinstance(value, dict) else None
    if not isinstance(current, int) or current < 1:
        raise ValueError(f"{join_uri(output_uri, schema.GENERATION_FILE)}: expected {{\"current\": N >= 1}}, "
                         f"got {value!r}")
    return current


def corpus_pages_folder(corpus_uri: str, endpoint_url: str | None = None, generation: int | None = None) -> str:
    """The pages folder a reader of ``--corpus`` uses: the given ``generation``, by default the
    current one (:func:`current_generation`). A ``.../pages`` URI is taken as it is."""
    stripped = corpus_uri.rstrip("/")
    if stripped.endswith("/" + schema.PAGES_DIR) or stripped == schema.PAGES_DIR:
        return stripped
    if generation is None:
        generation = current_generation(corpus_uri, endpoint_url)
    return schema.pages_folder(corpus_uri, generation)


# ----------------------------------------------------------------------------- output lock

LOCK_FILE = "_lock.json"
# A short lease, renewed often: a run killed on another host blocks the folder for at most
# this long; one killed on this host is seen dead at once (its pid is gone).
LOCK_TTL_S = 3 * 60
LOCK_RENEW_S = 30.0


# run_ids of the locks this process holds now (see OutputLock._holder_is_dead).
_LOCKS_HELD_HERE: set[str] = set()


class OutputLockedError(RuntimeError):
    """Another run holds the output folder's lock; the message names the holder and the
    file to delete if it is stale. Raised before anything is written."""


def _s3_bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _s3fs(endpoint: str | None):
    return _s3fs_cached(endpoint, _settings.timeout_s, _settings.attempts)


@functools.lru_cache(maxsize=8)
def _s3fs_cached(endpoint: str | None, timeout_s: float, attempts: int):
    import s3fs  # botocore's client through s3fs: conditional writes, multipart listing

    kwargs = {"endpoint_url": endpoint} if endpoint else {}
    # botocore's own retries ("standard" mode: throttling, 5xx, connection errors, backoff).
    config = {"connect_timeout": timeout_s, "read_timeout": timeout_s,
              "retries": {"mode": "standard", "max_attempts": attempts}}
    return s3fs.S3FileSystem(client_kwargs=kwargs, config_kwargs=config, skip_instance_cache=True)


def _precondition_failed(exc: BaseException) -> bool:
    """An S3 write refused by its If-None-Match / If-Match condition (412, or 409 when
    another conditional write of the same key is in flight)."""
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__ or exc.__context__
    resp = getattr(cause, "response", None) or getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412)


class OutputLock:
    """A lease on an output folder: ``OUT/_lock.json`` created only if absent (local
    ``O_CREAT|O_EXCL``, S3 ``PutObject IfNoneMatch="*"``), rewritten with a later expiry by a
    daemon thread while the job runs, deleted by :meth:`release`. A lock past its expiry was
    left by a run that died: it is taken over with a warning."""

    def __init__(self, output_uri: str, endpoint_url: str | None = None, ttl_s: float = LOCK_TTL_S,
                 renew_s: float = LOCK_RENEW_S):
        import socket
        import uuid

        self.output_uri = output_uri
        self.uri = join_uri(output_uri, LOCK_FILE)
        self.endpoint_url = endpoint_url
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.run_id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self.fs, self.path = open_filesystem(self.uri, endpoint_url)
        self.kind = ("local" if isinstance(self.fs, pafs.LocalFileSystem)
                     else "s3" if isinstance(self.fs, pafs.S3FileSystem)
                     else "gcs" if _gcsfs_of(self.fs) is not None else "other")
        self._stop = None
        self._thread = None
        self.held = False

    # -- content
    def _body(self) -> bytes:
        now = time.time()
        fmt = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
        return (json.dumps({"run_id": self.run_id, "host": self.host, "pid": self.pid,
                            "started_at": fmt(self.started), "renewed_at": fmt(now),
                            "expires_at": fmt(now + self.ttl_s), "expires_at_unix": now + self.ttl_s},
                           indent=2) + "\n").encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """(lock content or None if absent, S3 ETag or GCS generation)."""
        try:
            if self.kind == "gcs":
                gfs = _gcsfs_of(self.fs)
                bucket, key = _s3_bucket_key(self.path)
                from fsspec.asyn import sync

                # content and generation from one response, so they belong to the same object
                headers, data = sync(gfs.loop, gfs._call, "GET", "b/{}/o/{}", bucket, key, alt="media")
                generation = headers.get("x-goog-generation") or headers.get("X-Goog-Generation")
                if not generation:  # emulators may leave the header out: ask the object's metadata
                    meta = sync(gfs.loop, gfs._call, "GET", "b/{}/o/{}", bucket, key, json_out=True)
                    generation = meta.get("generation")
                return self._parse(data), generation
            if self.kind == "s3":
                bucket, key = _s3_bucket_key(self.path)
                resp = _s3fs(s3_endpoint(self.endpoint_url)).call_s3("get_object", Bucket=bucket, Key=key)
                from fsspec.asyn import sync  # the body is an aiobotocore stream: read it on s3fs's loop

                fs = _s3fs(s3_endpoint(self.endpoint_url))
                data = sync(fs.loop, resp["Body"].read)
                return self._parse(data), resp.get("ETag")
            with self.fs.open_input_stream(self.path) as f:
                return self._parse(f.read()), None
        except FileNotFoundError:
            return None, None

    @staticmethod
    def _parse(data: bytes) -> dict:
        try:
            value = json.loads(data)
            return value if isinstance(value, dict) else {}
        except ValueError:
            return {}  # unreadable: treated as expired (a torn write of a dead run)

    # -- create-only
    def _create(self, if_match: str | None = None) -> bool:
        """Write the lock if absent (or, S3, if still the object ``if_match``); False if held."""
        body = self._body()
        if self.kind == "local":
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.kind == "s3":
            bucket, key = _s3_bucket_key(self.path)
            cond = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
            try:
                _s3fs(s3_endpoint(self.endpoint_url)).call_s3("put_object", Bucket=bucket, Key=key, Body=body,
                                                               ContentType="application/json", **cond)
            except Exception as exc:  # noqa: BLE001 - s3fs turns ClientError into OSError subclasses
                if _precondition_failed(exc):
                    return False
                raise
            return True
        if self.kind == "gcs":
            # GCS create-only: ifGenerationMatch=0 (412 -> FileExistsError when the object
            # exists). The existence check before it costs one request; it also keeps the lock
            # exclusive on emulators that ignore preconditions (gcp-storage-emulator does).
            if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
                return False
            try:
                _gcsfs_of(self.fs).pipe_file(self.path, body, mode="create", content_type="application/json")
            except FileExistsError:
                return False
            return True
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound and not if_match:
            return False
        write_bytes_atomic(self.uri, body, self.endpoint_url)
        return True

    def _holder_is_dead(self, held: dict) -> bool:
        """A holder on this host whose process is gone (killed, crashed): its lease is void.
        So is one of this very process that no longer holds it (an earlier job of the same
        driver, a notebook or a test, that could not delete it, e.g. storage was down)."""
        if held.get("host") != self.host or not isinstance(held.get("pid"), int):
            return False
        if held["pid"] == self.pid:
            return held.get("run_id") not in _LOCKS_HELD_HERE
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _describe(self, held: dict) -> str:
        return (f"{self.output_uri} is in use by another run: {self.uri} is held by run "
                f"{held.get('run_id', '?')} on host {held.get('host', '?')} (pid {held.get('pid', '?')}) "
                f"since {held.get('started_at', '?')}, lease renewed at {held.get('renewed_at', '?')} and "
                f"valid until {held.get('expires_at', '?')}. Wait for it to finish; if that run is gone "
                f"(killed, host lost), delete {self.uri} and start again, or wait until the lease expires "
                f"and the next run takes it over.")

    def acquire(self) -> "OutputLock":
        if self.kind == "other":
            log.warning("%s: this filesystem has no create-only write; the output lock is a check then a "
                        "write, so two runs started at the same moment could both take it", self.uri)
        for _ in range(5):
            if self._create():
                break
            held, etag = self._read()
            if held is None:
                continue  # released between our write and our read: try again
            expires = held.get("expires_at_unix")
            if isinstance(expires, (int, float)) and expires > time.time() and not self._holder_is_dead(held):
                raise OutputLockedError(self._describe(held))
            lease_left = isinstance(expires, (int, float)) and expires > time.time()  # taken: its holder is dead
            why = ("its process on this host is gone" if lease_left
                   else f"its lease expired at {held.get('expires_at', '?')}")
            log.warning("taking over the lock %s of run %s (host %s, pid %s): %s; that run stopped without "
                        "releasing it", self.uri, held.get("run_id", "?"), held.get("host", "?"), held.get("pid", "?"),
                        why)
            if self._take_over(held, etag):
                break
        else:
            held, _ = self._read()
            raise OutputLockedError(self._describe(held or {}))
        self.held = True
        _LOCKS_HELD_HERE.add(self.run_id)
        log.info("output lock %s taken (run %s, lease %ds)", self.uri, self.run_id, self.ttl_s)
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="output-lock-renewal", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, stale: dict, etag: str | None) -> bool:
        """Replace the expired lock ``stale``, unless another run replaced it first."""
        if self.kind == "s3" and etag:
            return self._create(if_match=etag)
        if self.kind == "gcs" and etag:
            # Delete the stale lock only if it is still that generation (another taker that
            # replaced it first makes this a 412), then create-only.
            gfs = _gcsfs_of(self.fs)
            bucket, key = _s3_bucket_key(self.path)
            from fsspec.asyn import sync

            try:
                sync(gfs.loop, gfs._call, "DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(etag))
            except FileExistsError:  # 412: not the generation we read any more
                return False
            except FileNotFoundError:
                pass  # deleted by another taker: the create-only write decides
            return self._create()
        if self.kind == "local":
            aside = f"{self.path}.stale-{self.run_id}"
            try:
                os.rename(self.path, aside)  # atomic: one taker moves a given file
            except FileNotFoundError:
                return self._create()
            with open(aside, "rb") as f:
                moved = self._parse(f.read())
            if moved != stale:  # another run took it over first: put its lock back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                os.remove(aside)
                return False
            os.remove(aside)
            return self._create()
        self.fs.delete_file(self.path)
        return self._create()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                held, _ = self._read()
                if held is not None and held.get("run_id") not in (None, self.run_id):
                    log.error("output lock %s was taken by run %s on %s: another run may be writing to %s",
                              self.uri, held.get("run_id"), held.get("host"), self.output_uri)
                    return
                write_bytes_atomic(self.uri, self._body(), self.endpoint_url)  # ours: overwrite
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried next time
                log.warning("renewing output lock %s failed: %s", self.uri, exc)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _LOCKS_HELD_HERE.discard(self.run_id)
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=30)
        try:
            held, _ = self._read()
            if held is not None and held.get("run_id") == self.run_id:
                self.fs.delete_file(self.path)
                log.info("output lock %s released", self.uri)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not release output lock %s (%s): delete it by hand before the next run "
                        "if it is still there", self.uri, exc)


def acquire_output_lock(output_uri: str, endpoint_url: str | None = None, ttl_s: float = LOCK_TTL_S,
                        renew_s: float = LOCK_RENEW_S) -> OutputLock:
    """Take ``OUTPUT/_lock.json`` or raise :class:`OutputLockedError` naming its holder."""
    return OutputLock(output_uri, endpoint_url, ttl_s, renew_s).acquire()


def clean_output_leftovers(output_uri: str, endpoint_url: str | None = None,
                           folders: tuple[str, ...] = ("", "pages", "errors")) -> dict:
    """What a crashed run left under an output folder, removed (call it while holding the
    lock): local hidden ``.tmp-*`` files of :func:`write_bytes_atomic` in OUT, OUT/pages and
    OUT/errors; on S3, unfinished multipart uploads under the OUT prefix (aborted, so their
    parts stop being billed). Returns ``{"temporary_files": n, "multipart_uploads": m}``."""
    fs, root = open_filesystem(output_uri, endpoint_url)
    cleaned = {"temporary_files": 0, "multipart_uploads": 0}
    if isinstance(fs, pafs.LocalFileSystem):
        for sub in folders:
            folder = os.path.join(root, sub) if sub else root
            try:
                names = os.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                full = os.path.join(folder, name)
                if name.startswith(".tmp-") and os.path.isfile(full):
                    try:
                        os.remove(full)
                        cleaned["temporary_files"] += 1
                    except FileNotFoundError:
                        pass
    elif isinstance(fs, pafs.S3FileSystem):
        bucket, key = _s3_bucket_key(root.rstrip("/"))
        prefix = key + "/" if key else ""
        s3 = _s3fs(s3_endpoint(endpoint_url))
        kwargs: dict = {"Bucket": bucket, "Prefix": prefix}
        while True:
            resp = s3.call_s3("list_multipart_uploads", **kwargs)
            for up in resp.get("Uploads", []):
                s3.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                cleaned["multipart_uploads"] += 1
            if not resp.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = resp.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = resp.get("NextUploadIdMarker")
    if any(cleaned.values()):
        log.info("cleaned what an earlier run left in %s: %d temporary file(s), %d unfinished multipart "
                 "upload(s)", output_uri, cleaned["temporary_files"], cleaned["multipart_uploads"])
    return cleaned
