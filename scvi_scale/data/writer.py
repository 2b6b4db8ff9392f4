"""Streaming writer of AnnData Zarr count stores: row blocks in, a valid `anndata.read_zarr` store out.

Every converter and the synthetic generator write through `StoreWriter`: they append (counts, obs) row blocks of
any size; the writer re-blocks them into blocks of exactly `chunk_rows` rows, validates each block's counts (unless
told not to), and appends it to the arrays of X and obs. Memory holds at most about two row blocks, whatever the
number of cells.

Layout written (Zarr format 3 by default, which anndata >= 0.11 reads; 2 on request, for readers on zarr-python 2):
- X, CSR: a group with encoding-type csr_matrix and three 1-D arrays, `data` float32, `indices` int32 and
  `indptr` int32 below 2^31 non-zeros, int64 beyond (an atlas passes 2^31 near 10M cells), as scipy and anndata
  make them. indptr is streamed as int64 and narrowed when the store closes: scipy selects rows of a matrix with
  int32 indices and an int64 indptr by first copying all its indices to int64, so an in-memory reader of such a
  store (scanpy, scvi-tools' data loader) copied 320 MB per minibatch at 200k cells. Chunking, chosen for streaming
  row blocks: the data and indices chunks each hold about a quarter of the non-zeros of one block of `chunk_rows`
  rows (measured on the first block), so reading any block of chunk_rows rows touches 4-6 chunks and decodes at
  most about half a block more than it needs; `indptr` chunks cover 16 blocks. The group's attribute
  `scvi_scale_chunk_rows` records the block, which CountStore.chunk_rows reports. Blocks are appended whole
  chunks at a time (a partial chunk waits in memory), so no chunk is compressed twice.
- X, dense: a float32 array chunked (chunk_rows, n_vars): one chunk per row block (chunk_rows x n_vars x 4
  bytes each: keep chunk_rows modest for wide dense data).
- obs: written by anndata's own encoder (`anndata.io.write_elem`) for the first block, each later block encoded the
  same way and appended column by column; arrays chunked by chunk_rows. Categorical columns must carry the same
  categories in every block.
- var, uns and the empty obsm/varm/obsp/varp/layers groups: `anndata.io.write_elem`.
Compression: Blosc lz4hc level 3 with byte shuffle, chosen by measurement (benchmarks/history/issue-27.md): on count
data it decodes several times faster than zstd level 3 (the loader decodes every chunk at least once an epoch) for
somewhat more bytes, and encodes about as fast. Stores written with another codec (e.g. zstd, as scvi-scale wrote
before) read as before: the codec is in each array's metadata. Values are cast to float32 after validation (integer
counts are exact in float32 up to 2^24; a value beyond float32's range is refused, not stored as inf).

Integrity: in format 3 every array (X, obs, var, uns) ends each chunk with a crc32c checksum (zarr's `crc32c`
codec), which zarr verifies on every read: a flipped bit, a truncated or overwritten chunk is an error, never a
wrong count. Format 2 has no codec for it, so format-2 stores carry no checksums (CountStore says so once).
Every chunk of X is written, even one of zeros (zarr skips those by default), and X's attribute
`scvi_scale_every_chunk_written` says so: an absent chunk is then known to be lost (see store.py). Cost: a few
percent of a block read (benchmarks/integrity.py; benchmarks/RESULTS.md, Integrity checks).

Crash safety: everything is written to a hidden sibling directory `.<name>.partial-<host>-<pid>-<random>` and
renamed onto the final path only after the last block, obs, uns and the consolidated metadata are written; an
interrupted write leaves no store at the final path. A killed writer cannot clean up after itself, so the next
StoreWriter of the same path removes the siblings left by processes of this host that are gone. A store at a URL
(s3://, gs://) is built the same way under TMPDIR (data.remote.staging_folder) and then uploaded with the root's
metadata last (data.remote.upload_node), so no reader opens it before it is whole; replacing one (overwrite=True)
deletes the old store first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import socket
import uuid
import warnings
from pathlib import Path

import numcodecs
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec

from scvi_scale.data import remote
from scvi_scale.data.store import CHUNK_ROWS_ATTR, EVERY_CHUNK_ATTR, StoreError
from scvi_scale.data.validate import check_counts

logger = logging.getLogger("scvi_scale.data")

DEFAULT_CHUNK_ROWS = 4096
NNZ_CHUNKS_PER_BLOCK = 4  # data/indices chunks per row block (see the module docstring)
MIN_NNZ_CHUNK = 16_384  # smallest data/indices chunk, in values: keeps very sparse stores from tiny chunk files
INDPTR_CHUNK_BLOCKS = 16  # row blocks per indptr chunk
INT32_INDEX_LIMIT = np.iinfo(np.int32).max  # up to this many non-zeros, indptr is stored as int32
COMPRESSOR_NAME, COMPRESSION_LEVEL = "lz4hc", 3  # Blosc's compressor and level (see the module docstring)
DEFAULT_ZARR_FORMAT = 3
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}  # zarr's array config: chunks of zeros are written too


def _compressors(zarr_format: int):
    """Blosc lz4hc with byte shuffle, then (format 3) a crc32c checksum, in the codec spelling each format wants."""
    if zarr_format == 2:
        return numcodecs.Blosc(cname=COMPRESSOR_NAME, clevel=COMPRESSION_LEVEL, shuffle=numcodecs.Blosc.SHUFFLE)
    return [BloscCodec(cname=COMPRESSOR_NAME, clevel=COMPRESSION_LEVEL, shuffle="shuffle"), Crc32cCodec()]


SCRATCH_KINDS = ("partial", "replaced", "buckets")  # the store being written, the one it replaces, 10x buckets


def scratch_sibling(path: Path, kind: str) -> Path:
    """A hidden sibling of `path` for temporary files, named for this host and process so that a later run can tell
    whether its writer is gone: `.<name>.<kind>-<host>-<pid>-<random>`, kind one of SCRATCH_KINDS."""
    return path.parent / f".{path.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def write_atomically(path: str | os.PathLike, write) -> Path:
    """Call `write(temporary_path)`, then rename the temporary file over `path`, so a reader never sees a torn file.
    The temporary file is a scratch_sibling: removed on an error here, and by remove_abandoned_siblings(path) when a
    kill left it. An OSError that names no file or the temporary one is raised naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = scratch_sibling(path, "partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if error.filename not in (None, str(temporary)):
            raise
        # a full disk names no file, a refused write the temporary one: name the file the caller asked for
        raise type(error)(error.errno, error.strerror, str(path)) from error
    finally:
        temporary.unlink(missing_ok=True)
    return path


def remove_abandoned_siblings(path: Path) -> None:
    """Delete the scratch siblings of `path` (see scratch_sibling) whose process, on this host, is gone.

    Also those of the older form `.<name>.partial-<12 hex digits>`, written before writers named themselves.
    """
    if not path.parent.is_dir():
        return
    name, kinds = re.escape(path.name), "|".join(SCRATCH_KINDS)
    named = re.compile(rf"\.{name}\.(?:{kinds})-(?P<host>.+)-(?P<pid>\d+)-[0-9a-z_]+")
    older = re.compile(rf"\.{name}\.(?:partial|replaced)-[0-9a-f]{{12}}")
    for sibling in path.parent.iterdir():
        match = named.fullmatch(sibling.name)
        if match is not None and not _is_gone(match["host"], int(match["pid"])):
            continue
        if match is None and older.fullmatch(sibling.name) is None:
            continue
        shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
        logger.info("removed %s, left behind by an interrupted write of %s", sibling, path)


def _is_gone(host: str, pid: int) -> bool:
    """True when process `pid` of `host` no longer runs; False when it runs or when `host` is another machine."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        return False
    return False


def write_elem(group: zarr.Group, key: str, value, **kwargs) -> None:
    """anndata.io.write_elem without zarr's notice that v3 sharding will change defaults (we set chunks ourselves)."""
    import anndata

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        anndata.io.write_elem(group, key, value, **kwargs)


class _ChunkAlignedAppender:
    """Appends along axis 0 of a zarr array writing whole chunks only; the last partial chunk waits in memory."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self.chunk = array.chunks[0]
        self.tail = np.empty((0,) + array.shape[1:], dtype=array.dtype)

    def append(self, values: np.ndarray) -> None:
        values = np.concatenate([self.tail, values]) if len(self.tail) else values
        n_whole = len(values) // self.chunk * self.chunk
        self._write(values[:n_whole])
        self.tail = values[n_whole:].copy()

    def close(self) -> None:
        self._write(self.tail)
        self.tail = self.tail[:0]

    def _write(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        start = self.array.shape[0]
        self.array.resize((start + len(values),) + self.array.shape[1:])
        self.array[start:] = values


class StoreWriter:
    """Write an AnnData Zarr count store from appended row blocks; see the module docstring for the layout.

        >>> with StoreWriter("out.zarr", var=var_frame, chunk_rows=4096) as writer:
        ...     for counts, obs in blocks:            # counts (rows, n_vars) CSR or dense; obs a DataFrame of rows
        ...         writer.append(counts, obs)
        ...     writer.close(uns={"source": "..."})   # optional: leaving the block closes too; an error aborts

    path: the store to create. var: DataFrame indexed by unique gene names, one row per column of the counts.
    sparse: write X as CSR (True) or dense (False). validate: check every block's counts (finite, non-negative,
    integer-valued, within float32's range) and raise CountValidationError at the first bad one. zarr_format: 3
    (checksummed) or 2. overwrite: replace an existing store at `path` (only once the new one is complete). where:
    how errors name the source. obs columns of strings must not hold missing values (anndata would store NaN as the
    string 'nan', a category of its own): StoreError names the rows.
    """

    def __init__(
        self,
        path,
        var: pd.DataFrame,
        *,
        sparse: bool = True,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        validate: bool = True,
        zarr_format: int = DEFAULT_ZARR_FORMAT,
        overwrite: bool = False,
        where: str | None = None,
    ):
        # a URL (s3://, gs://): built under TMPDIR, then uploaded with the root's metadata last (remote.upload_node)
        self.url = os.fspath(path) if remote.is_url(os.fspath(path)) else None
        self.path = Path(path) if self.url is None else remote.staging_folder(self.url) / "store"
        self.where = where or str(path)
        if self._exists() and not overwrite:
            raise StoreError(f"{self.where} already exists; pass overwrite=True to replace it")
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        if zarr_format not in (2, 3):
            raise ValueError(f"zarr_format must be 2 or 3, got {zarr_format}")
        if len(var) == 0:
            raise StoreError(f"{self.where}: no genes (var is empty); an empty store is not allowed")
        var = var.set_axis(var.index.astype(str))
        duplicated = var.index[var.index.duplicated()]
        if len(duplicated):
            raise StoreError(
                f"{self.where}: {len(duplicated)} duplicated var names, e.g. {list(duplicated[:5])}; "
                "make them unique (e.g. AnnData.var_names_make_unique) before writing"
            )
        self.var_names = var.index
        self.n_vars = len(var)
        self.sparse = bool(sparse)
        self.chunk_rows = int(chunk_rows)
        self.validate = validate
        self.zarr_format = zarr_format
        self.overwrite = overwrite
        self.n_obs = 0  # rows accepted so far (validated, maybe still pending)
        self._n_written = 0  # rows written to the store
        self._nnz = 0
        self._pending: list[tuple[object, pd.DataFrame]] = []
        self._pending_rows = 0
        self._obs_dtypes: pd.Series | None = None
        self._appenders: dict[str, _ChunkAlignedAppender] = {}
        self._closed = False

        self._compressors = _compressors(zarr_format)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_siblings(self.path)
        self._partial = scratch_sibling(self.path, "partial")
        self._root = zarr.open_group(str(self._partial), mode="w-", zarr_format=zarr_format)
        self._root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(self._root, "var", var, dataset_kwargs=self._dataset_kwargs())
        for name in ("layers", "obsm", "varm", "obsp", "varp"):
            write_elem(self._root, name, {})

    def _dataset_kwargs(self, **kwargs) -> dict:
        """anndata's dataset_kwargs for the arrays it writes: our compressors (checksums in format 3)."""
        return {"compressors": self._compressors, **kwargs}

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    # --- appending ---------------------------------------------------------------------------------------------

    def append(self, counts, obs: pd.DataFrame) -> None:
        """Append rows: counts (rows, n_vars) scipy sparse or array-like of counts; obs a DataFrame of those rows."""
        if self._closed:
            raise RuntimeError(f"{self.path}: the writer is closed")
        n_rows = counts.shape[0]
        if len(counts.shape) != 2 or counts.shape[1] != self.n_vars:
            raise StoreError(
                f"{self.where}: a block of counts has shape {counts.shape}, expected (rows, {self.n_vars})"
            )
        if len(obs) != n_rows:
            raise StoreError(
                f"{self.where}: rows [{self.n_obs}, {self.n_obs + n_rows}) have {n_rows} rows of counts but "
                f"{len(obs)} rows of obs"
            )
        if n_rows == 0:
            return
        obs = obs.set_axis(obs.index.astype(str))
        self._check_obs_schema(obs)
        self._check_no_missing_strings(obs)
        if self.sparse:
            counts = sp.csr_matrix(counts)
            if not counts.has_canonical_format:  # duplicates summed, columns sorted within rows (on a copy)
                counts = counts.copy()
                counts.sum_duplicates()
        else:
            counts = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
        if self.validate:
            check_counts(counts, self.n_obs, obs.index, self.var_names, self.where)
        counts = counts.astype(np.float32, copy=False)
        self._pending.append((counts, obs))
        self._pending_rows += n_rows
        self.n_obs += n_rows
        if self._pending_rows >= self.chunk_rows:
            self._write_pending(final=False)

    def _check_obs_schema(self, obs: pd.DataFrame) -> None:
        """Every block must have the first block's columns and dtypes (categoricals: the same categories)."""
        if self._obs_dtypes is None:
            self._obs_dtypes = obs.dtypes
            return
        if list(obs.columns) != list(self._obs_dtypes.index):
            raise StoreError(
                f"{self.where}: obs columns of rows from {self.n_obs} are {list(obs.columns)}, "
                f"earlier rows had {list(self._obs_dtypes.index)}"
            )
        for column, dtype in self._obs_dtypes.items():
            if obs[column].dtype != dtype:
                raise StoreError(
                    f"{self.where}: obs column {column!r} of rows from {self.n_obs} has dtype {obs[column].dtype}, "
                    f"earlier rows had {dtype}; every block needs the same dtype (categoricals: same categories)"
                )

    def _check_no_missing_strings(self, obs: pd.DataFrame) -> None:
        """A missing value in a column of strings would be written as the string 'nan': refuse it, naming the rows."""
        for column in obs.columns:
            if obs[column].dtype != object:
                continue
            missing = np.flatnonzero(obs[column].isna().to_numpy())
            if len(missing):
                rows = (self.n_obs + missing[:5]).tolist()
                raise StoreError(
                    f"{self.where}: obs column {column!r} (strings) has missing values (NaN/None) in {len(missing)} "
                    f"row(s) of rows [{self.n_obs}, {self.n_obs + len(obs)}), e.g. rows {rows} (cells "
                    f"{obs.index[missing[:5]].tolist()}); anndata would store them as the string 'nan', which "
                    "would become a category of its own: fill them, or make the column categorical (NaN stays "
                    "missing there)"
                )

    def _write_pending(self, final: bool) -> None:
        """Write all whole blocks of chunk_rows rows that are pending (and the remainder too when final)."""
        counts_parts, obs_parts = zip(*self._pending)
        if len(counts_parts) == 1:
            counts, obs = counts_parts[0], obs_parts[0]
        else:
            counts = sp.vstack(counts_parts, format="csr") if self.sparse else np.concatenate(counts_parts)
            obs = pd.concat(obs_parts)
        n_rows = counts.shape[0]
        n_to_write = n_rows if final else n_rows // self.chunk_rows * self.chunk_rows
        for start in range(0, n_to_write, self.chunk_rows):
            stop = min(start + self.chunk_rows, n_to_write)
            self._write_block(counts[start:stop], obs.iloc[start:stop])
        self._pending = [(counts[n_to_write:], obs.iloc[n_to_write:])] if n_to_write < n_rows else []
        self._pending_rows = n_rows - n_to_write

    def _write_block(self, counts, obs: pd.DataFrame) -> None:
        if self._n_written == 0:
            self._create_x(counts)
            write_elem(self._root, "obs", obs, dataset_kwargs=self._dataset_kwargs(chunks=(self.chunk_rows,)))
        else:
            self._append_obs(obs)
        if self.sparse:
            self._appenders["data"].append(counts.data)
            self._appenders["indices"].append(counts.indices.astype(np.int32, copy=False))
            self._appenders["indptr"].append(counts.indptr[1:].astype(np.int64) + self._nnz)
            self._nnz += counts.nnz
        else:
            self._appenders["X"].append(counts)
        self._n_written += counts.shape[0]

    def _create_x(self, first_block) -> None:
        """Create X sized for the first block: CSR data/indices chunks hold a quarter of a block's non-zeros."""
        if not self.sparse:
            dense = self._root.create_array(
                "X",
                shape=(0, self.n_vars),
                chunks=(self.chunk_rows, self.n_vars),
                dtype="float32",
                compressors=self._compressors,
                config=WRITE_EVERY_CHUNK,
            )
            dense.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0", EVERY_CHUNK_ATTR: True})
            self._appenders["X"] = _ChunkAlignedAppender(dense)
            return
        nnz_per_row = first_block.nnz / first_block.shape[0]
        nnz_chunk = max(MIN_NNZ_CHUNK, math.ceil(nnz_per_row * self.chunk_rows / NNZ_CHUNKS_PER_BLOCK))
        group = self._root.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", EVERY_CHUNK_ATTR: True})
        for name, dtype, chunk in (
            ("data", "float32", nnz_chunk),
            ("indices", "int32", nnz_chunk),
            ("indptr", "int64", self.chunk_rows * INDPTR_CHUNK_BLOCKS),
        ):
            array = group.create_array(
                name, shape=(0,), chunks=(chunk,), dtype=dtype, compressors=self._compressors, config=WRITE_EVERY_CHUNK
            )
            self._appenders[name] = _ChunkAlignedAppender(array)
        self._appenders["indptr"].append(np.zeros(1, dtype=np.int64))

    def _append_obs(self, obs: pd.DataFrame) -> None:
        """Encode the block's obs exactly as anndata would (in memory), then append each array to the store's."""
        scratch = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=self.zarr_format)
        write_elem(scratch, "obs", obs)
        target = self._root["obs"]
        for column_path, array in _arrays_below(scratch["obs"]):
            if column_path.endswith("/categories"):
                continue  # the same in every block (checked in _check_obs_schema)
            target[column_path].append(array[:])

    # --- finishing ---------------------------------------------------------------------------------------------

    def _exists(self) -> bool:
        return self.path.exists() if self.url is None else remote.group_exists(self.url)

    def close(self, uns: dict | None = None) -> Path | str:
        """Write what is pending, uns and the metadata, then move the store into place. Returns its path (its URL
        for a store in a bucket)."""
        if self._closed:
            return self.path if self.url is None else self.url
        try:
            if self._pending_rows:
                self._write_pending(final=True)
            if self._n_written == 0:
                raise StoreError(f"{self.where}: no rows were written; an empty store is not allowed")
            for appender in self._appenders.values():
                appender.close()
            if self.sparse:
                shape = [self._n_written, self.n_vars]
                self._root["X"].attrs.update({"shape": shape, CHUNK_ROWS_ATTR: self.chunk_rows})
                if self._nnz <= INT32_INDEX_LIMIT:
                    self._narrow_indptr()
            write_elem(self._root, "uns", dict(uns or {}), dataset_kwargs=self._dataset_kwargs())
            with warnings.catch_warnings():
                # zarr warns that consolidated metadata is not yet in the Zarr v3 spec; anndata writes it anyway.
                warnings.simplefilter("ignore", UserWarning)
                zarr.consolidate_metadata(str(self._partial))
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path if self.url is None else self.url

    def _narrow_indptr(self) -> None:
        """Rewrite X/indptr as int32, chunk by chunk (every value is at most the non-zero count, < 2^31)."""
        group = self._root["X"]
        wide = group["indptr"]
        narrow = group.create_array(
            "indptr_int32",
            shape=wide.shape,
            chunks=wide.chunks,
            dtype="int32",
            compressors=self._compressors,
            config=WRITE_EVERY_CHUNK,
        )
        for start in range(0, wide.shape[0], wide.chunks[0]):
            narrow[start : start + wide.chunks[0]] = wide[start : start + wide.chunks[0]].astype(np.int32)
        del group["indptr"]
        # Zarr arrays do not record their own name, so the finished array is renamed on the file system.
        (self._partial / "X" / "indptr_int32").rename(self._partial / "X" / "indptr")

    def _move_into_place(self) -> None:
        replaced = None
        if self._exists() and not self.overwrite:
            raise StoreError(f"{self.where} appeared while writing; pass overwrite=True to replace it")
        if self.url is not None:  # an existing store is removed first: none is at the URL until the upload ends
            if self._exists():
                remote.remove_node(self.url)
            remote.upload_node(self._partial, self.url)
            self._drop_partial()
            return
        if self.path.exists():
            replaced = scratch_sibling(self.path, "replaced")
            self.path.rename(replaced)
        self._partial.rename(self.path)
        if replaced is not None:
            shutil.rmtree(replaced) if replaced.is_dir() else replaced.unlink()

    def abort(self) -> None:
        """Drop the partial store; the final path is left as it was."""
        self._closed = True
        self._drop_partial()

    def _drop_partial(self) -> None:
        shutil.rmtree(self._partial, ignore_errors=True)
        if self.url is not None:
            with contextlib.suppress(OSError):  # not empty: another writer of the same URL on this machine
                self.path.parent.rmdir()


def _arrays_below(group: zarr.Group, prefix: str = ""):
    """(relative path, array) for every array under `group`, depth first."""
    for name, member in group.members():
        if isinstance(member, zarr.Array):
            yield prefix + name, member
        else:
            yield from _arrays_below(member, prefix + name + "/")
