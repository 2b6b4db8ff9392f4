"""Read-only, lazy access to the counts of an AnnData store written in Zarr, proven as they are read.

An AnnData Zarr store (format 2 or 3, as `anndata.write_zarr` or our `write_store` writes it) holds the count
matrix either as a dense 2-D array or as a CSR group with three 1-D arrays: `data` (values), `indices` (column of
each value) and `indptr` (row r's values are data[indptr[r]:indptr[r + 1]]). `CountStore` opens such a store and
hands out contiguous row blocks, never the whole matrix: a CSR row block costs one read of indptr[start:stop + 1]
and one read of the matching slice of data and indices.

    >>> store = CountStore("atlas.zarr")                # counts in X; CountStore(path, layer="counts") for a layer
    >>> block = store.read_csr(0, store.chunk_rows)    # scipy CSR, float32, (chunk_rows, n_vars)
    >>> lazy = store.to_dask()                         # (n_obs, n_vars), one dask chunk per row block

Integrity: a block is handed out only once it is proven.
- Checksums. Stores our writer makes in Zarr format 3 end every chunk with a crc32c checksum, verified whenever
  the chunk is decoded: by zarr, or by data/chunks.py, which reads such arrays of local stores from their chunk
  files directly (zarr's per-chunk machinery costs several times the decoding) and leaves any failure to zarr.
  Format-2 stores and stores written by others have none (said once, in a log line).
- Absent chunks. Zarr reads a chunk that is not on disk as its fill value (zeros), so a lost chunk of X/indices
  would move counts to gene 0 unseen. X is read through a view of the store in which an absent chunk is an error.
  One exception: zarr skips writing chunks that hold only zeros, which in a dense X may be real cells, so a dense X
  without our writer's mark (`scvi_scale_every_chunk_written`) reads absent chunks as zeros and says how many once.
- On opening: the arrays of X are on disk (not only listed in the consolidated metadata), indptr has n_obs + 1
  entries from 0 to nnz = len(data) = len(indices), obs and var match the matrix.
- On every block read: indptr does not decrease over the block and stays within [0, nnz], every column index is in
  [0, n_vars), and each row's columns are sorted without repeats (a store that is not: said once, sorted on read).
A chunk that is absent or does not decode (checksum mismatch, truncated, decompression error) raises StoreError
naming the store, the array, the chunk key and the rows the chunk holds. Reading every block, as `validate_counts`
and `Registry.build` (hence SCVI.setup_zarr) do, therefore proves the whole store; benchmarks/integrity.py measures
what the checks cost per block read.

All errors about a store's layout or content derive from `StoreError` (a ValueError); bad count values raise its
subclass `CountValidationError`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
import zarr.errors
from zarr.codecs import Crc32cCodec
from zarr.storage import WrapperStore

from scvi_scale.data import remote
from scvi_scale.data.chunks import ChunkReadFailed, chunk_file_reader
from scvi_scale.data.remote import RemoteStoreError

# anndata and dask are imported where used: importing anndata (which imports dask) costs ~1 s of a process's start
if TYPE_CHECKING:
    import dask.array as da

logger = logging.getLogger("scvi_scale.data")

# Attribute our writer sets on a CSR group: the row block its data/indices chunks were sized for.
CHUNK_ROWS_ATTR = "scvi_scale_chunk_rows"
# Attribute our writer sets on X: every chunk was written (zarr skips chunks of zeros unless told otherwise), so an
# absent chunk of a dense X was lost, not skipped.
EVERY_CHUNK_ATTR = "scvi_scale_every_chunk_written"
# Row block for CSR stores written by others when their data chunks say nothing useful.
DEFAULT_CSR_CHUNK_ROWS = 10_000
# Bounds on a row block derived from a foreign store's data chunk length (see CountStore._foreign_csr_chunk_rows).
MIN_DERIVED_CHUNK_ROWS = 1_000
MAX_DERIVED_CHUNK_ROWS = 100_000
INDPTR_CACHE_BYTES = 64 << 20  # decoded indptr kept per open CSR store: all of it up to ~8M rows (int64 entries)
# Keys zarr looks up that are metadata, not chunks: their absence is an answer, not damage.
_METADATA_KEYS = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})

_said: set[tuple[str, str]] = set()  # (store path, topic) of the notices already logged by this process


def _say_once(level: int, path: str, topic: str, message: str, *args) -> None:
    if (path, topic) not in _said:
        _said.add((path, topic))
        logger.log(level, message, *args)


class StoreError(ValueError):
    """A store, its layout or its content is not what scvi-scale can use; the message says what and where."""


class CountValidationError(StoreError):
    """Count values are not finite, non-negative integers; the message names the rows, the cell and the value."""


def read_element(element):
    """anndata.io.read_elem of one obs or var column (or index) of a Zarr store: string-array and array read as
    zarr reads them, categorical as pandas.Categorical of its codes and categories, as anndata reads them; other
    encodings (nullable integers, ...) by anndata itself. Training reads only these, so it never imports anndata."""
    encoding = element.attrs.get("encoding-type")
    if encoding in ("string-array", "array"):
        return np.asarray(element[...])
    if encoding == "categorical":
        return pd.Categorical.from_codes(
            np.asarray(element["codes"][...]),
            categories=read_element(element["categories"]),
            ordered=bool(element.attrs.get("ordered", False)),
        )
    import anndata

    return anndata.io.read_elem(element)


def open_anndata_group(path, storage_options: dict | None = None) -> zarr.Group:
    """Open `path` (a local path or a URL, see data.remote) read-only as the root group of an AnnData Zarr store, or
    raise StoreError saying why not (RemoteStoreError when the bucket or the credentials are at fault)."""
    try:
        root = zarr.open_group(remote.zarr_store(path, storage_options), mode="r")
    except (OSError, zarr.errors.BaseZarrError) as error:
        problem = remote.diagnose(str(path), storage_options) if remote.is_url(str(path)) else None
        if problem is not None:
            raise RemoteStoreError(problem) from None
        raise StoreError(f"{path}: not a Zarr group, so not an AnnData Zarr store ({error})") from None
    encoding = root.attrs.get("encoding-type")
    if encoding not in (None, "anndata") or "obs" not in root or "var" not in root:
        raise StoreError(
            f"{path}: a Zarr group but not an AnnData store (encoding-type={encoding!r}, "
            f"members {sorted(root.keys())}; expected encoding-type 'anndata' with 'obs' and 'var')"
        )
    return root


def _counts_path(root: zarr.Group, layer: str | None, path: str) -> str:
    """Where the counts are in the store: "X", or "layers/<layer>"; StoreError when there are none."""
    available = sorted(root["layers"].keys()) if "layers" in root else []
    if layer is None:
        if "X" not in root or root["X"].attrs.get("encoding-type") == "null":
            raise StoreError(f"{path}: the store has no X; pass layer= one of the layers {available}")
        return "X"
    if layer not in available:
        raise StoreError(f"{path}: no layer {layer!r}; the store's layers are {available}")
    return f"layers/{layer}"


class _AbsentChunk(Exception):
    """A chunk that the store does not hold (args[0]: its key)."""


class _AbsentChunksFail(WrapperStore):
    """A zarr store seen so that reading an absent chunk raises _AbsentChunk instead of giving zarr's fill value."""

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None and key.rsplit("/", 1)[-1] not in _METADATA_KEYS:
            raise _AbsentChunk(key)
        return value


def _has_checksums(array: zarr.Array) -> bool:
    return array.metadata.zarr_format == 3 and any(isinstance(codec, Crc32cCodec) for codec in array.metadata.codecs)


class CountStore:
    """Read-only lazy view of an AnnData-Zarr store's counts (X or a layer), obs and var. Never loads X whole.

    Attributes:
        path, layer: what was opened.
        n_obs, n_vars, shape: matrix size (cells x genes).
        is_sparse: True for a CSR group, False for a dense 2-D array.
        chunk_rows: the natural row block for reading. Dense: the array's row chunk. CSR: the block our writer
            aligned the data/indices chunks to (attribute `scvi_scale_chunk_rows`); for CSR stores written by others,
            the number of rows whose non-zeros fill one data chunk, kept within [1,000, 100,000].
        checksummed: every chunk of the counts carries a crc32c checksum that each read verifies.
        var_names, obs_names: pandas Index of gene and cell names (read on first use).

    Opening checks the layout and every read proves its block (see the module docstring); both raise StoreError naming
    what is wrong and where. Thread-safe for reading: a prefetcher may call read_csr/read_dense from several threads
    at once. Pickles as (path, layer, storage_options), so dask workers reopen the store themselves. A CountStore is
    path-like (os.fspath gives its path), so it can be passed wherever a store's path is asked for.

    path may be a URL (s3://, gs://, https://; see data.remote); storage_options (fsspec's, e.g. credentials or an
    endpoint) are remembered for it in this process, so later opens of the same URL need not repeat them.
    """

    shape: tuple[int, ...]  # set by _open_dense or _open_csr
    chunk_rows: int

    def __init__(self, path, layer: str | None = None, storage_options: dict | None = None):
        self.path = os.fspath(path)
        self.layer = layer
        self._storage_options = storage_options
        remote.remember_options(self.path, storage_options)
        root = open_anndata_group(self.path, storage_options)
        counts_path = _counts_path(root, layer, self.path)
        where = f"{self.path}: {'X' if layer is None else f'layer {layer!r}'}"
        listed = root[counts_path]  # as the consolidated metadata describes it, when the store has that
        every_chunk_written = isinstance(listed, zarr.Group) or bool(listed.attrs.get(EVERY_CHUNK_ATTR))
        # The counts are opened from their own metadata files, through a view where absent chunks are errors.
        on_disk = zarr.open_group(
            store=_AbsentChunksFail(root.store) if every_chunk_written else root.store, mode="r", use_consolidated=False
        )
        try:
            counts = on_disk[counts_path]
        except KeyError:
            raise StoreError(
                f"{where} is listed in the store's consolidated metadata but is not on disk (its metadata file is "
                "missing): the store is damaged; restore it from a copy or rewrite it from its source"
            ) from None
        self._chunk_files: dict = {}  # none while _open_csr reads indptr's ends; filled below
        if isinstance(counts, zarr.Array):
            self._open_dense(counts, counts_path, where, every_chunk_written)
            arrays: tuple = (counts,)
        else:
            self._open_csr(counts, where)
            arrays = (self._data, self._indices, self._indptr)
        # Local arrays our writer made are read from their chunk files directly (chunks.py); others through zarr.
        self._chunk_files = {array.path: reader for array in arrays if (reader := chunk_file_reader(array))}
        self.n_obs, self.n_vars = self.shape
        self._n_columns = self.n_vars  # columns of the stored matrix (a subclass may present other genes)
        if 0 in self.shape:
            raise StoreError(f"{where} is empty: shape {self.shape}")
        self.chunk_rows = max(1, min(self.chunk_rows, self.n_obs))
        self.checksummed = all(_has_checksums(array) for array in arrays)
        if not self.checksummed:
            _say_once(
                logging.INFO,
                self.path,
                "no checksums",
                "%s: %s carries no chunk checksums (Zarr format %d, written by another tool or an older scvi-scale); "
                "its structure is still checked on every read (write_store rewrites it with checksums)",
                self.path,
                counts_path,
                counts.metadata.zarr_format,
            )
        self._root = root
        self._counts = counts
        self._check_obs_and_var(root["obs"])

    def _open_dense(self, counts: zarr.Array, counts_path: str, where: str, every_chunk_written: bool) -> None:
        """Check a dense counts array and keep its shape and chunk_rows; warn once when chunks are absent (read as
        zeros) from a store not known to have every chunk written."""
        if counts.ndim != 2:
            raise StoreError(f"{where} is a {counts.ndim}-D array; counts must be 2-D (cells x genes)")
        self.is_sparse = False
        self.shape = (int(counts.shape[0]), int(counts.shape[1]))
        self.chunk_rows = int(counts.chunks[0])
        if not every_chunk_written and counts.nchunks_initialized < counts.nchunks:
            _say_once(
                logging.WARNING,
                self.path,
                "absent dense chunks",
                "%s: %d of the %d chunks of %s are not on disk and read as zeros: zarr skips writing chunks that "
                "hold only zeros, but a chunk lost in a copy reads the same (write_store rewrites the store with "
                "every chunk written)",
                self.path,
                counts.nchunks - counts.nchunks_initialized,
                counts.nchunks,
                counts_path,
            )

    def _check_obs_and_var(self, obs: zarr.Group) -> None:
        """StoreError when obs has no index or another number of rows than the counts, or var's names are
        duplicated or not one per column."""
        index_key = obs.attrs.get("_index", "_index")
        if index_key not in obs:
            raise StoreError(f"{self.path}: obs has no index array {index_key!r}; the store is damaged")
        if obs[index_key].shape[0] != self.n_obs:
            raise StoreError(
                f"{self.path}: obs has {obs[index_key].shape[0]} rows but the counts have {self.n_obs} rows; "
                "obs and X must describe the same cells"
            )
        duplicated = self.var_names[self.var_names.duplicated()]
        if len(duplicated):
            raise StoreError(
                f"{self.path}: {len(duplicated)} duplicated var names, e.g. {list(duplicated[:5])}; "
                "make them unique (e.g. AnnData.var_names_make_unique) before using the store"
            )
        if len(self.var_names) != self.n_vars:
            raise StoreError(
                f"{self.path}: var has {len(self.var_names)} rows but the counts have {self.n_vars} columns"
            )

    def _open_csr(self, group: zarr.Group, where: str) -> None:
        """Check a csr_matrix group's arrays against each other and keep them; sets shape, nnz and chunk_rows."""
        encoding = group.attrs.get("encoding-type")
        if encoding != "csr_matrix":
            raise StoreError(
                f"{where} has encoding-type {encoding!r}; only a dense array or a csr_matrix group can be read "
                "row by row (convert a CSC store with scvi_scale.data.write_store)"
            )
        missing = [name for name in ("data", "indices", "indptr") if name not in group]
        if missing or "shape" not in group.attrs:
            lacking = missing + ([] if "shape" in group.attrs else ["its shape attribute"])
            raise StoreError(f"{where} is a csr_matrix group without {lacking} on disk; the store is damaged")
        self.is_sparse = True
        self.shape = tuple(int(size) for size in group.attrs["shape"])
        if 0 in self.shape:
            raise StoreError(f"{where} is empty: shape {self.shape}")
        self._data, self._indices, self._indptr = group["data"], group["indices"], group["indptr"]
        self._indptr_chunks: OrderedDict[int, np.ndarray] = OrderedDict()  # decoded, by chunk index (see below)
        self._indptr_chunks_lock = threading.Lock()
        for array in (self._data, self._indices, self._indptr):
            if array.ndim != 1:
                raise StoreError(f"{where}: {array.path} is {array.ndim}-D; the arrays of a CSR matrix are 1-D")
        for array in (self._indices, self._indptr):
            if array.dtype.kind not in "iu":
                raise StoreError(f"{where}: {array.path} has dtype {array.dtype}; CSR indices must be integers")
        if self._indptr.shape[0] != self.shape[0] + 1:
            raise StoreError(
                f"{where}: indptr has {self._indptr.shape[0]} entries for {self.shape[0]} rows "
                f"(expected {self.shape[0] + 1})"
            )
        self.nnz = int(self._data.shape[0])
        if self._indices.shape[0] != self.nnz:
            raise StoreError(
                f"{where}: data holds {self.nnz} values but indices {self._indices.shape[0]}; they must match"
            )
        first = int(self._read(self._indptr, 0, 1)[0])
        last = int(self._read(self._indptr, self.shape[0], self.shape[0] + 1)[0])
        if (first, last) != (0, self.nnz):
            raise StoreError(
                f"{where}: indptr runs from {first} to {last}, but it must run from 0 to {self.nnz}, the number of "
                "stored values (the length of data and indices); the store is damaged"
            )
        self.chunk_rows = int(group.attrs.get(CHUNK_ROWS_ATTR) or self._foreign_csr_chunk_rows())

    def _foreign_csr_chunk_rows(self) -> int:
        """Rows whose non-zeros about fill one data chunk, for CSR stores that do not record their row block."""
        if self.nnz == 0 or self.shape[0] == 0:
            return DEFAULT_CSR_CHUNK_ROWS
        nnz_per_row = self.nnz / self.shape[0]
        rows_per_chunk = int(self._data.chunks[0] / nnz_per_row)
        return int(np.clip(rows_per_chunk, MIN_DERIVED_CHUNK_ROWS, MAX_DERIVED_CHUNK_ROWS))

    def __fspath__(self) -> str:
        return self.path

    @property
    def is_remote(self) -> bool:
        """Whether the store is at a URL: its reads wait on requests (the samplers read more blocks at once)."""
        return remote.is_url(self.path)

    def __getstate__(self):  # storage options travel to dask workers in memory, as the store object does
        return {"path": self.path, "layer": self.layer, "storage_options": self._storage_options}

    def __setstate__(self, state):
        self.__init__(state["path"], state["layer"], state.get("storage_options"))  # type: ignore[misc]  # unpickling

    def __repr__(self) -> str:
        kind = "CSR" if self.is_sparse else "dense"
        layer = "" if self.layer is None else f", layer={self.layer!r}"
        return f"CountStore({self.path!r}{layer}: {self.n_obs} x {self.n_vars} {kind}, chunk_rows={self.chunk_rows})"

    # --- obs and var -------------------------------------------------------------------------------------------

    @functools.cached_property
    def var_names(self) -> pd.Index:
        var = self._root["var"]
        return pd.Index(read_element(var[var.attrs.get("_index", "_index")]))

    @functools.cached_property
    def obs_names(self) -> pd.Index:
        obs = self._root["obs"]
        return pd.Index(read_element(obs[obs.attrs.get("_index", "_index")]))

    def obs_name_hashes(self) -> np.ndarray:
        """(n_obs,) uint64 hashes of the obs names, read block by block (8 bytes a cell, never the names whole):
        for checking that the names are unique at atlas scale."""
        if "obs_names" in self.__dict__:  # already read
            names = self.obs_names
        else:
            obs = self._root["obs"]
            names = obs[obs.attrs.get("_index", "_index")]
        block = 4_096  # names hashed at once: under a MB of temporaries, whatever the store's chunking
        hashes = np.empty(self.n_obs, dtype=np.uint64)  # filled in place: a list of parts would double the peak
        for start in range(0, self.n_obs, block):
            hashes[start : start + block] = pd.util.hash_array(np.asarray(names[start : start + block], dtype=object))
        return hashes

    def obs_keys(self) -> list[str]:
        """The obs column names, in the order anndata keeps them."""
        return list(self._root["obs"].attrs.get("column-order", []))

    def obs_column(self, key: str) -> pd.Series:
        """One obs column, indexed by row position (obs_names, 10M strings at atlas scale, are read only when
        asked for); categoricals stay categorical. Reads only that column."""
        if key not in self.obs_keys():
            raise StoreError(f"{self.path}: obs has no column {key!r}; its columns are {self.obs_keys()}")
        values = read_element(self._root["obs"][key])
        if len(values) != self.n_obs:
            raise StoreError(f"{self.path}: obs column {key!r} has {len(values)} rows, the counts have {self.n_obs}")
        return pd.Series(values, name=key)

    def var_frame(self) -> pd.DataFrame:
        """The whole var DataFrame (small: one row per gene)."""
        import anndata

        return anndata.io.read_elem(self._root["var"])

    # --- counts ------------------------------------------------------------------------------------------------

    def read_raw(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Rows [start, stop) in the stored value dtype: scipy CSR for CSR stores, numpy array for dense ones.

        For validation and library sizes, which must see the values before any cast to float32. The block is
        proven first (chunks present and intact; CSR structure, see the module docstring), else StoreError.
        """
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"row range [{start}, {stop}) is outside [0, {self.n_obs}) of {self.path}")
        if not self.is_sparse:
            return self._read(self._counts, start, stop)
        indptr = self._indptr_entries(start, stop + 1)
        if not (indptr[0] >= 0 and indptr[-1] <= self.nnz and np.all(indptr[1:] >= indptr[:-1])):
            raise self._indptr_error(indptr, start)
        first, last = int(indptr[0]), int(indptr[-1])
        indices = self._read(self._indices, first, last)
        # One pass for both bounds: seen as unsigned, a negative index is larger than any column.
        if len(indices) and indices.view(f"u{indices.dtype.itemsize}").max() >= self._n_columns:
            raise self._column_error(indices, indptr, start)
        data = self._read(self._data, first, last)
        block = sp.csr_matrix((data, indices, indptr - first), shape=(stop - start, self._n_columns))
        if not block.has_canonical_format:
            _say_once(
                logging.WARNING,
                self.path,
                "unsorted",
                "%s: %s is not sorted within rows (or repeats a column in a row), first in rows [%d, %d); each "
                "block is sorted on read, which costs time (write_store rewrites the store sorted)",
                self.path,
                self._indices.path,
                start,
                stop,
            )
            block.sum_duplicates()
        return block

    def _indptr_entries(self, start: int, stop: int) -> np.ndarray:
        """indptr[start:stop] as int64, from decoded indptr chunks kept in memory (at most INDPTR_CACHE_BYTES of
        them, the least recently used dropped first). Why: a training block of 1,024 rows reads ~1,025 entries of a
        65,536-entry chunk, so without the cache every block decodes that chunk again, one of its three zarr reads
        (a sizeable share of a block's read time: benchmarks/history/issue-16.md). A chunk is proven (present,
        checksum) when decoded."""
        size = self._indptr.chunks[0]
        pieces = []
        for chunk in range(start // size, (stop - 1) // size + 1):
            with self._indptr_chunks_lock:
                decoded = self._indptr_chunks.get(chunk)
                if decoded is not None:
                    self._indptr_chunks.move_to_end(chunk)
            if decoded is None:  # decoded outside the lock: two threads may both decode a chunk, never wrongly
                decoded = self._read(self._indptr, chunk * size, (chunk + 1) * size).astype(np.int64, copy=False)
                decoded.flags.writeable = False  # callers get views of it
                with self._indptr_chunks_lock:
                    self._indptr_chunks[chunk] = decoded
                    while len(self._indptr_chunks) * size * 8 > INDPTR_CACHE_BYTES and len(self._indptr_chunks) > 1:
                        self._indptr_chunks.popitem(last=False)
            pieces.append(decoded[max(start - chunk * size, 0) : stop - chunk * size])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    # --- proving reads -------------------------------------------------------------------------------------------

    def _read(self, array: zarr.Array, start: int, stop: int) -> np.ndarray:
        """array[start:stop] along axis 0, or StoreError naming the chunk that is absent or does not decode."""
        reader = self._chunk_files.get(array.path)
        if reader is not None:
            try:
                return reader.read(start, stop)
            except ChunkReadFailed:
                pass  # zarr reads the range again and raises what is wrong (or reads an absent chunk as zeros)
        try:
            return np.asarray(array[start:stop])
        except RemoteStoreError:  # the server failed after retries: named already, the chunk is not at fault
            raise
        except Exception as error:
            raise self._chunk_error(array, start, stop, error) from error

    def _chunk_error(self, array: zarr.Array, start: int, stop: int, error: Exception) -> StoreError:
        """Read the chunks of array[start:stop] one by one to find the one at fault, and say what is wrong with it."""
        size = array.chunks[0]
        other_axes = [range(-(-extent // chunk)) for extent, chunk in zip(array.shape[1:], array.chunks[1:])]
        for coords in itertools.product(range(start // size, -(-stop // size)), *other_axes):
            try:
                array[tuple(slice(index * chunk, (index + 1) * chunk) for index, chunk in zip(coords, array.chunks))]
            except Exception as chunk_error:
                if isinstance(chunk_error, _AbsentChunk):
                    problem = "is missing from the store (deleted, or lost in a copy)"
                elif "checksum" in str(chunk_error):
                    problem = "fails its crc32c checksum (its bytes changed after it was written)"
                else:
                    problem = f"cannot be decoded ({type(chunk_error).__name__}: {chunk_error})"
                return StoreError(
                    f"{self.path}: chunk {self._chunk_key(array, coords)} of {array.path} {problem}; it holds "
                    f"{self._held_by(array, coords[0])}. Restore the store from a copy or rewrite it from its source"
                )
        return StoreError(f"{self.path}: reading {array.path}[{start}:{stop}] failed: {type(error).__name__}: {error}")

    @staticmethod
    def _chunk_key(array: zarr.Array, coords) -> str:
        return f"{array.path}/{array.metadata.encode_chunk_key(tuple(coords))}"

    def _held_by(self, array: zarr.Array, chunk_index: int) -> str:
        """What chunk `chunk_index` (along axis 0) of one of the counts' arrays holds, in rows."""
        low = chunk_index * array.chunks[0]
        high = min(low + array.chunks[0], array.shape[0])
        if not self.is_sparse:
            return f"rows [{low}, {high})"
        if array is self._indptr:
            return f"the offsets of rows [{max(low - 1, 0)}, {min(high, self.shape[0])})"
        try:
            indptr = np.asarray(self._indptr[:])  # on the way to an error only: the whole indptr
        except Exception:
            return f"values [{low}, {high}) of rows that X/indptr cannot tell (it does not read either)"
        first_row = int(np.searchsorted(indptr, low, side="right")) - 1
        last_row = int(np.searchsorted(indptr, high - 1, side="right"))
        return f"values [{low}, {high}), of rows [{first_row}, {last_row})"

    def _indptr_error(self, indptr: np.ndarray, start: int) -> StoreError:
        """indptr (the entries start..stop of the store's) decreases or leaves [0, nnz]: say where."""
        previous = np.concatenate([[0], indptr[:-1]])
        bad = int(np.argmax((indptr < 0) | (indptr > self.nnz) | (indptr < previous)))
        entry = start + bad
        if 0 <= indptr[bad] <= self.nnz:
            problem = f"is {indptr[bad]}, below the entry before it ({previous[bad]}); indptr must not decrease"
        else:
            problem = f"is {indptr[bad]}, outside [0, {self.nnz}] (nnz, the number of stored values)"
        coords = (entry // self._indptr.chunks[0],)
        return StoreError(
            f"{self.path}: {self._indptr.path} is damaged: entry {entry} (the start of row {entry}) {problem}; "
            f"it is in chunk {self._chunk_key(self._indptr, coords)}, which holds "
            f"{self._held_by(self._indptr, coords[0])}"
        )

    def _column_error(self, indices: np.ndarray, indptr: np.ndarray, start: int) -> StoreError:
        """A column index of the block is outside [0, n_vars): name the row, the value and the chunk."""
        position = int(np.argmax(indices.view(f"u{indices.dtype.itemsize}") >= self._n_columns))
        row = start + int(np.searchsorted(indptr, indptr[0] + position, side="right")) - 1
        value_index = int(indptr[0]) + position
        coords = (value_index // self._indices.chunks[0],)
        return StoreError(
            f"{self.path}: {self._indices.path} is damaged: row {row} has column index {indices[position]}, outside "
            f"[0, {self._n_columns}) (the store has {self._n_columns} genes); it is value {value_index}, in chunk "
            f"{self._chunk_key(self._indices, coords)}, which holds {self._held_by(self._indices, coords[0])}"
        )

    def read_csr(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as scipy CSR, float32, shape (stop - start, n_vars); works for dense stores too."""
        block = self.read_raw(start, stop)
        if self.is_sparse:
            return block.astype(np.float32, copy=False)
        return sp.csr_matrix(block.astype(np.float32, copy=False))

    def read_dense(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a float32 numpy array of shape (stop - start, n_vars)."""
        block = self.read_raw(start, stop)
        if self.is_sparse:
            return block.astype(np.float32, copy=False).toarray()  # type: ignore[union-attr]  # CSR; scipy is untyped
        return block.astype(np.float32, copy=False)

    def block_bounds(self, block_rows: int | None = None) -> np.ndarray:
        """Row boundaries [0, b, 2b, ..., n_obs] for blocks of b = block_rows (default chunk_rows) rows."""
        block_rows = self.chunk_rows if block_rows is None else int(block_rows)
        if block_rows < 1:
            raise ValueError(f"block_rows must be at least 1, got {block_rows}")
        return np.append(np.arange(0, self.n_obs, block_rows, dtype=np.int64), np.int64(self.n_obs))

    def to_dask(self) -> da.Array:
        """The counts as a lazy float32 dask array (n_obs, n_vars), rows chunked by chunk_rows.

        Each chunk spans all genes; for CSR stores the chunks are scipy CSR matrices.
        """
        import dask.array as da

        bounds = self.block_bounds()
        read = self.read_csr if self.is_sparse else self.read_dense
        meta = sp.csr_matrix((0, 0), dtype=np.float32) if self.is_sparse else np.empty((0, 0), dtype=np.float32)

        def read_block(block_info=None):
            start, stop = block_info[None]["array-location"][0]
            return read(start, stop)

        return da.map_blocks(
            read_block,
            chunks=(tuple(np.diff(bounds).tolist()), (self.n_vars,)),
            dtype=np.float32,
            meta=meta,
            name="count-store-" + da.core.tokenize(self.path, self.layer, self.chunk_rows, self.shape),
        )
