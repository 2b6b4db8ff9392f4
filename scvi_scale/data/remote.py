"""Stores at URLs: s3:// and gs:// (read and write), http(s):// (read only), as zarr stores over fsspec.

    >>> store = zarr_store("s3://bucket/atlas.zarr", {"profile": "lab"})   # a zarr Store (a local path: the str)
    >>> is_url("gs://bucket/atlas.zarr"), is_url("atlas.zarr")            # (True, False)

The reader is zarr's FsspecStore over s3fs / gcsfs / fsspec's HTTP file system (`pip install scvi-scale[cloud]`).
Why fsspec and not obstore: one path for S3, GCS and HTTPS; the AWS and Google credential chains as botocore and
google-auth implement them (environment, config files and profiles, AWS_ENDPOINT_URL for S3-compatible servers,
application default credentials); the `storage_options` that anndata, dask and pandas users already pass; and
anndata.read_zarr opens the same URLs. obstore spent about half the time per chunk GET on a loopback S3 server
(tried once on a shared machine, so not recorded as a result): a few milliseconds a chunk, small beside training
on the ~10^5 counts a chunk of our stores holds (a quarter of a row block).

Credentials: `storage_options` (a dict, as fsspec takes it) are kept in memory for the URL they were given with
(`remember_options`), so a store opened again in this process (SCVI(url), the outputs, a reopened CountStore)
finds them; they are never logged, printed, pickled into files nor saved into a model directory. Without them the
standard chains apply.

Retries: every GET, HEAD, PUT and DELETE through `zarr_store` (listings are not) is retried on throttling, 5xx
answers and timeouts, RETRY_ATTEMPTS times with exponential backoff and jitter (RETRY_FIRST_DELAY_S doubling up to
RETRY_MAX_DELAY_S), then raises RemoteStoreError naming the object. s3fs's and botocore's own retries are turned
off there (one retry layer, the same for every scheme; gcsfs keeps its own, below ours); the uploads of
`upload_node` go through `filesystem`, retried by s3fs / gcsfs alone. Missing credentials and a bucket that does
not exist raise RemoteStoreError saying which (see `diagnose`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from zarr.storage import FsspecStore, WrapperStore

logger = logging.getLogger("scvi_scale.data")

URL_SCHEMES = ("s3", "gs", "gcs", "http", "https")
READ_ONLY_SCHEMES = ("http", "https")
RETRY_ATTEMPTS = 6
RETRY_FIRST_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 10.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TIMEOUT_NAMES = frozenset(
    {
        "TimeoutError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "FSTimeoutError",
        "ServerTimeoutError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientConnectorError",
        "IncompleteRead",
        "ResponseParserError",
    }
)
_NO_CREDENTIALS_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"})
# Given to zarr_store's s3fs unless the caller's storage_options say otherwise: botocore's retries off (ours
# instead); a connection pool as deep as the requests our readers keep in flight (sampler.REMOTE_NUM_WORKERS block
# reads, each fetching its chunks at once; botocore's default pool of 10 would queue them); max_concurrency 1, because
# above 1 s3fs sends a HEAD before every whole-object GET (to split objects over 50 MB, which chunks never are):
# twice the requests and the latency per chunk.
_S3_DEFAULTS: dict[str, Any] = {
    "max_concurrency": 1,
    "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "max_pool_connections": 64},
}

# Metadata files of a Zarr node, in the order upload_node puts them last (format 2: the attributes before the file
# that makes the node exist).
NODE_METADATA = (".zattrs", ".zarray", ".zgroup", "zarr.json")

_options: dict[str, dict] = {}  # storage options by store URL (no trailing '/'), for this process only


class RemoteStoreError(ValueError):
    """A request to a store at a URL failed for good (after retries), or cannot be made (no credentials, no
    bucket); the message names the object and says what failed, never the credentials."""


def is_url(path) -> bool:
    """Whether `path` is a URL of a scheme we read (s3, gs, gcs, http, https), not a local path."""
    return isinstance(path, str) and "://" in path and path.split("://", 1)[0].lower() in URL_SCHEMES


def remember_options(url: str, storage_options: dict | None) -> None:
    """Keep `storage_options` for `url` (a URL; a local path is ignored), so later opens of the same store in this
    process use them."""
    if storage_options is not None and is_url(url):
        _options[url.rstrip("/")] = dict(storage_options)


def options_for(url: str, storage_options: dict | None = None) -> dict:
    """The storage options to open `url` with: those given, else those remembered for it or for a store above it
    (an output store in the input's bucket), else none (the standard credential chains)."""
    if storage_options is not None:
        return dict(storage_options)
    url = url.rstrip("/")
    for known in sorted(_options, key=len, reverse=True):
        if url == known or url.startswith(known + "/") or _bucket_url(url) == _bucket_url(known):
            return dict(_options[known])
    return {}


def _bucket_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _options_with_defaults(url: str, storage_options: dict | None, retried_by_us: bool) -> dict:
    """options_for(url) over our defaults: listings never cached (a store being written changes under them), and
    for zarr_store's S3 requests _S3_DEFAULTS."""
    options = {"use_listings_cache": False, **options_for(url, storage_options)}
    if retried_by_us and url.lower().startswith("s3://"):  # merged into the caller's botocore config, not replaced
        config = {**_S3_DEFAULTS["config_kwargs"], **options.get("config_kwargs", {})}
        options = {**_S3_DEFAULTS, **options, "config_kwargs": config}
    return options


def zarr_store(path, storage_options: dict | None = None, read_only: bool = True):
    """A zarr store for `path`: the local path as a str, or for a URL an FsspecStore that retries (see the module
    docstring). Raises RemoteStoreError for writing to an http(s) URL, and when fsspec lacks the scheme's package."""
    path = str(path)
    if not is_url(path):
        return path
    scheme = path.split("://", 1)[0].lower()
    if scheme in READ_ONLY_SCHEMES and not read_only:
        raise RemoteStoreError(f"{path}: http(s) stores are read-only; write outputs to a local, s3:// or gs:// store")
    try:
        store = FsspecStore.from_url(
            path, storage_options=_options_with_defaults(path, storage_options, True), read_only=read_only
        )
    except ImportError as error:
        raise RemoteStoreError(
            f"{path}: reading {scheme}:// needs {error.name or 'its fsspec package'}: pip install 'scvi-scale[cloud]'"
        ) from None
    if scheme == "s3":
        store.fs.retries = 1  # s3fs retries timeouts and SlowDown 5 times itself (a class attribute): ours instead
    return _Retrying(store, path)


def filesystem(url: str, storage_options: dict | None = None):
    """The (synchronous) fsspec file system of `url` and the path within it, for listing, copying and deleting
    objects; with the same options as `zarr_store`, retried by s3fs / gcsfs themselves (not by ours)."""
    import fsspec

    options = _options_with_defaults(url, storage_options, False)
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        raise RemoteStoreError(
            f"{url}: needs {error.name or 'its fsspec package'}: pip install 'scvi-scale[cloud]'"
        ) from None


def group_exists(url: str) -> bool:
    """Whether a Zarr group's metadata is at `url`."""
    fs, root = filesystem(url)
    return any(fs.exists(f"{root}/{name}") for name in (".zgroup", "zarr.json"))


def upload_node(node: Path, url: str) -> None:
    """Upload the local Zarr node `node` (a folder: a group or an array, with all below it) to `url`, its own
    metadata files last: they are the completion marker, since a prefix without them is no member of its parent
    to zarr nor to anndata, so no reader sees the node before they land, and the whole node after. What is at
    `url` already is deleted first: the caller has checked it is no complete node (a killed upload's objects)."""
    fs, target = filesystem(url)
    if fs.exists(target):
        remove_node(url)
    markers = [name for name in NODE_METADATA if (node / name).is_file()]
    files = [
        path for path in sorted(node.rglob("*")) if path.is_file() and path.relative_to(node).as_posix() not in markers
    ]
    if files:
        fs.put([str(path) for path in files], [f"{target}/{path.relative_to(node).as_posix()}" for path in files])
    for name in markers:
        fs.put_file(str(node / name), f"{target}/{name}")


def remove_node(url: str) -> None:
    """Delete the Zarr node at `url`, its own metadata first (so no reader sees a node losing its parts)."""
    fs, target = filesystem(url)
    for name in reversed(NODE_METADATA):
        if fs.exists(f"{target}/{name}"):
            fs.rm_file(f"{target}/{name}")
    if fs.exists(target):
        fs.rm(target, recursive=True)


def staging_folder(url: str) -> Path:
    """A local folder, under TMPDIR, for what is built before it is uploaded to `url` (named for the URL; its parent
    is created, the folder itself not)."""
    name = resolved(url)
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    parent = Path(tempfile.gettempdir()) / "scvi-scale-staging"
    parent.mkdir(parents=True, exist_ok=True)
    return parent / f"{name.rsplit('/', 1)[-1]}-{digest}"


def diagnose(url: str, storage_options: dict | None = None) -> str | None:
    """Why `url` cannot be opened, when the reason is the bucket or the credentials: one sentence, else None."""
    scheme, bucket = urlsplit(url).scheme.lower(), urlsplit(url).netloc
    if scheme not in ("s3", "gs", "gcs"):
        return None
    try:
        fs, _ = filesystem(url, storage_options)
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        return f"{url}: there is no bucket {bucket!r} (or it is not visible to these credentials)"
    except PermissionError:
        return f"{url}: the credentials were refused for bucket {bucket!r} (access denied)"
    except Exception as error:  # noqa: BLE001 - classified below, else not the bucket's nor the credentials' fault
        return _credentials_problem(url, error)
    return None


def _credentials_problem(url: str, error: BaseException) -> str | None:
    for link in _chain(error):
        if type(link).__name__ in _NO_CREDENTIALS_NAMES:
            if url.startswith("s3://"):
                return (
                    f"{url}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                    "AWS_PROFILE, or ~/.aws/credentials), or pass storage_options={'anon': True} for a public "
                    "bucket"
                )
            return (
                f"{url}: no Google credentials found: run `gcloud auth application-default login` or set "
                "GOOGLE_APPLICATION_CREDENTIALS, or pass storage_options={'token': 'anon'} for a public bucket"
            )
    return None


def _chain(error: BaseException | None):
    """`error` and its causes / contexts."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _http_status(error: BaseException) -> int | None:
    for link in _chain(error):
        response = getattr(link, "response", None)
        if isinstance(response, dict):  # botocore's ClientError
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status:
                return int(status)
        for name in ("status", "code"):  # aiohttp's ClientResponseError, gcsfs' HttpError
            status = getattr(link, name, None)
            if isinstance(status, int) and 100 <= status < 600:
                return status
    return None


def is_transient(error: BaseException) -> bool:
    """Throttling, a 5xx answer, a timeout or a dropped connection: worth another try."""
    if isinstance(error, RemoteStoreError):
        return False
    if any(
        type(link).__name__ in _TIMEOUT_NAMES or isinstance(link, (TimeoutError, ConnectionError))
        for link in _chain(error)
    ):
        return True
    return _http_status(error) in _TRANSIENT_STATUS


class _Retrying(WrapperStore):
    """A zarr store whose requests are retried when they fail transiently, then fail with RemoteStoreError naming
    the object (see the module docstring). A whole-object GET of a key that is being fetched already waits for that
    request instead of sending its own: neighbouring row blocks read at once share the chunk between them (a
    1,024-row block's data starts and ends inside chunks of ~1,000 rows), and each such chunk then costs one request,
    not two. Nothing is kept once the request is answered, so no answer can be stale."""

    def __init__(self, store: FsspecStore, url: str):
        super().__init__(store)
        self.url = url.rstrip("/")
        self._fetching: dict[tuple, asyncio.Future] = {}  # (event loop, key, buffer prototype) -> its GET

    def _with_store(self, store):
        return type(self)(store, self.url)

    def __repr__(self) -> str:
        return f"_Retrying({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, _Retrying) and self._store == other._store

    async def _call(self, what: str, key: str, request):
        delay = RETRY_FIRST_DELAY_S
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                return await request()
            except Exception as error:  # noqa: BLE001 - classified: retried, named, or passed on as it is
                problem = _credentials_problem(self.url, error)
                if problem is not None:
                    raise RemoteStoreError(problem) from None
                if not is_transient(error):
                    raise
                if attempt == RETRY_ATTEMPTS:
                    status = _http_status(error)
                    raise RemoteStoreError(
                        f"{self.url}/{key}: {what} failed {RETRY_ATTEMPTS} times ("
                        f"{f'HTTP {status}' if status else type(error).__name__}); the server is failing or "
                        "unreachable, try again later"
                    ) from None
                logger.info(
                    "%s/%s: %s failed (%s), try %d of %d in %.1f s",
                    self.url,
                    key,
                    what,
                    type(error).__name__,
                    attempt + 1,
                    RETRY_ATTEMPTS,
                    delay,
                )
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, RETRY_MAX_DELAY_S)

    async def get(self, key, prototype, byte_range=None):
        if byte_range is not None:
            return await self._call("GET", key, lambda: self._store.get(key, prototype, byte_range))
        fetch = (id(asyncio.get_running_loop()), key, prototype)
        shared = self._fetching.get(fetch)
        if shared is None:
            shared = self._fetching[fetch] = asyncio.ensure_future(
                self._call("GET", key, lambda: self._store.get(key, prototype))
            )
            shared.add_done_callback(lambda _: self._fetching.pop(fetch, None))
        return await asyncio.shield(shared)  # a cancelled reader leaves the request to the others waiting on it

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        keys = ",".join(key for key, _ in key_ranges[:3])
        return await self._call("GET", keys, lambda: self._store.get_partial_values(prototype, key_ranges))

    async def exists(self, key):
        return await self._call("HEAD", key, lambda: self._store.exists(key))

    async def set(self, key, value):
        return await self._call("PUT", key, lambda: self._store.set(key, value))

    async def delete(self, key):
        return await self._call("DELETE", key, lambda: self._store.delete(key))


def resolved(path) -> str:
    """A store's name as recorded and compared: a URL as it is (without a trailing '/'), a local path resolved."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else str(Path(path).resolve())
