"""Read-only, lazy access to the counts of an AnnData store written in Zarr.

An AnnData Zarr store (format 2 or 3, as `anndata.write_zarr` or our `write_store` writes it) holds the count
matrix either as a dense 2-D array or as a CSR group with three 1-D arrays: `data` (values), `indices` (column of
each value) and `indptr` (row r's values are data[indptr[r]:indptr[r + 1]]). `CountStore` opens such a store and
hands out contiguous row blocks, never the whole matrix: a CSR row block costs one read of indptr[start:stop + 1]
and one read of the matching slice of data and indices.

    >>> store = CountStore("atlas.zarr")                # counts in X; CountStore(path, layer="counts") for a layer
    >>> block = store.read_csr(0, store.chunk_rows)    # scipy CSR, float32, (chunk_rows, n_vars)
    >>> lazy = store.to_dask()                         # (n_obs, n_vars), one dask chunk per row block

All errors about a store's layout or content derive from `StoreError` (a ValueError); bad count values raise its
subclass `CountValidationError`.
"""

from __future__ import annotations

import functools
import os

import anndata
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
import zarr.errors

# Attribute our writer sets on a CSR group: the row block its data/indices chunks were sized for.
CHUNK_ROWS_ATTR = "scvi_scale_chunk_rows"
# Row block for CSR stores written by others when their data chunks say nothing useful.
DEFAULT_CSR_CHUNK_ROWS = 10_000
# Bounds on a row block derived from a foreign store's data chunk length (see CountStore._foreign_csr_chunk_rows).
MIN_DERIVED_CHUNK_ROWS = 1_000
MAX_DERIVED_CHUNK_ROWS = 100_000


class StoreError(ValueError):
    """A store, its layout or its content is not what scvi-scale can use; the message says what and where."""


class CountValidationError(StoreError):
    """Count values are not finite, non-negative integers; the message names the rows, the cell and the value."""


def open_anndata_group(path) -> zarr.Group:
    """Open `path` read-only as the root group of an AnnData Zarr store, or raise StoreError saying why not."""
    try:
        root = zarr.open_group(str(path), mode="r")
    except (OSError, zarr.errors.BaseZarrError) as error:
        raise StoreError(f"{path}: not a Zarr group, so not an AnnData Zarr store ({error})") from None
    encoding = root.attrs.get("encoding-type")
    if encoding not in (None, "anndata") or "obs" not in root or "var" not in root:
        raise StoreError(
            f"{path}: a Zarr group but not an AnnData store (encoding-type={encoding!r}, "
            f"members {sorted(root.keys())}; expected encoding-type 'anndata' with 'obs' and 'var')"
        )
    return root


def _locate_counts(root: zarr.Group, layer: str | None, path: str):
    """The zarr node (CSR group or dense array) holding the counts: X, or layers/<layer>."""
    available = sorted(root["layers"].keys()) if "layers" in root else []
    if layer is None:
        if "X" not in root or root["X"].attrs.get("encoding-type") == "null":
            raise StoreError(f"{path}: the store has no X; pass layer= one of the layers {available}")
        return root["X"]
    if layer not in available:
        raise StoreError(f"{path}: no layer {layer!r}; the store's layers are {available}")
    return root["layers"][layer]


class CountStore:
    """Read-only lazy view of an AnnData-Zarr store's counts (X or a layer), obs and var. Never loads X whole.

    Attributes:
        path, layer: what was opened.
        n_obs, n_vars, shape: matrix size (cells x genes).
        is_sparse: True for a CSR group, False for a dense 2-D array.
        chunk_rows: the natural row block for reading. Dense: the array's row chunk. CSR: the block our writer
            aligned the data/indices chunks to (attribute `scvi_scale_chunk_rows`); for CSR stores written by others,
            the number of rows whose non-zeros fill one data chunk, kept within [1,000, 100,000].
        var_names, obs_names: pandas Index of gene and cell names (read on first use).

    Thread-safe for reading: a prefetcher may call read_csr/read_dense from several threads at once. Pickles as
    (path, layer), so dask workers reopen the store themselves. A CountStore is path-like (os.fspath gives its
    path), so it can be passed wherever a store's path is asked for.
    """

    def __init__(self, path, layer: str | None = None):
        self.path = os.fspath(path)
        self.layer = layer
        root = open_anndata_group(self.path)
        counts = _locate_counts(root, layer, self.path)
        where = f"{self.path}: {'X' if layer is None else f'layer {layer!r}'}"
        if isinstance(counts, zarr.Array):
            if counts.ndim != 2:
                raise StoreError(f"{where} is a {counts.ndim}-D array; counts must be 2-D (cells x genes)")
            self.is_sparse = False
            self.shape = (int(counts.shape[0]), int(counts.shape[1]))
            self.chunk_rows = int(counts.chunks[0])
        else:
            encoding = counts.attrs.get("encoding-type")
            if encoding != "csr_matrix":
                raise StoreError(
                    f"{where} has encoding-type {encoding!r}; only a dense array or a csr_matrix group can be read "
                    "row by row (convert a CSC store with scvi_scale.data.write_store)"
                )
            missing = [name for name in ("data", "indices", "indptr") if name not in counts]
            if missing:
                raise StoreError(f"{where} is a csr_matrix group without {missing}")
            self.is_sparse = True
            self.shape = tuple(int(size) for size in counts.attrs["shape"])
            self._data, self._indices, self._indptr = counts["data"], counts["indices"], counts["indptr"]
            if self._indptr.shape[0] != self.shape[0] + 1:
                raise StoreError(
                    f"{where}: indptr has {self._indptr.shape[0]} entries for {self.shape[0]} rows "
                    f"(expected {self.shape[0] + 1})"
                )
            self.chunk_rows = int(counts.attrs.get(CHUNK_ROWS_ATTR) or self._foreign_csr_chunk_rows())
        self.n_obs, self.n_vars = self.shape
        if self.n_obs == 0 or self.n_vars == 0:
            raise StoreError(f"{where} is empty: shape {self.shape}")
        self.chunk_rows = max(1, min(self.chunk_rows, self.n_obs))
        self._root = root
        self._counts = counts
        obs_index = root["obs"][root["obs"].attrs.get("_index", "_index")]
        if obs_index.shape[0] != self.n_obs:
            raise StoreError(
                f"{self.path}: obs has {obs_index.shape[0]} rows but the counts have {self.n_obs} rows; "
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

    def _foreign_csr_chunk_rows(self) -> int:
        """Rows whose non-zeros about fill one data chunk, for CSR stores that do not record their row block."""
        n_rows = self.shape[0]
        total_nnz = int(self._indptr[n_rows]) if n_rows else 0
        if total_nnz == 0:
            return DEFAULT_CSR_CHUNK_ROWS
        nnz_per_row = total_nnz / n_rows
        rows_per_chunk = int(self._data.chunks[0] / nnz_per_row)
        return int(np.clip(rows_per_chunk, MIN_DERIVED_CHUNK_ROWS, MAX_DERIVED_CHUNK_ROWS))

    def __fspath__(self) -> str:
        return self.path

    def __getstate__(self):
        return {"path": self.path, "layer": self.layer}

    def __setstate__(self, state):
        self.__init__(state["path"], state["layer"])

    def __repr__(self) -> str:
        kind = "CSR" if self.is_sparse else "dense"
        layer = "" if self.layer is None else f", layer={self.layer!r}"
        return f"CountStore({self.path!r}{layer}: {self.n_obs} x {self.n_vars} {kind}, chunk_rows={self.chunk_rows})"

    # --- obs and var -------------------------------------------------------------------------------------------

    @functools.cached_property
    def var_names(self) -> pd.Index:
        var = self._root["var"]
        return pd.Index(anndata.io.read_elem(var[var.attrs.get("_index", "_index")]))

    @functools.cached_property
    def obs_names(self) -> pd.Index:
        obs = self._root["obs"]
        return pd.Index(anndata.io.read_elem(obs[obs.attrs.get("_index", "_index")]))

    def obs_keys(self) -> list[str]:
        """The obs column names, in the order anndata keeps them."""
        return list(self._root["obs"].attrs.get("column-order", []))

    def obs_column(self, key: str) -> pd.Series:
        """One obs column indexed by obs_names; categoricals stay categorical. Reads only that column."""
        if key not in self.obs_keys():
            raise StoreError(f"{self.path}: obs has no column {key!r}; its columns are {self.obs_keys()}")
        values = anndata.io.read_elem(self._root["obs"][key])
        if len(values) != self.n_obs:
            raise StoreError(f"{self.path}: obs column {key!r} has {len(values)} rows, the counts have {self.n_obs}")
        return pd.Series(values, index=self.obs_names, name=key)

    def var_frame(self) -> pd.DataFrame:
        """The whole var DataFrame (small: one row per gene)."""
        return anndata.io.read_elem(self._root["var"])

    # --- counts ------------------------------------------------------------------------------------------------

    def read_raw(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Rows [start, stop) in the stored value dtype: scipy CSR for CSR stores, numpy array for dense ones.

        For validation and library sizes, which must see the values before any cast to float32.
        """
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"row range [{start}, {stop}) is outside [0, {self.n_obs}) of {self.path}")
        if not self.is_sparse:
            return np.asarray(self._counts[start:stop])
        indptr = np.asarray(self._indptr[start : stop + 1], dtype=np.int64)
        first, last = int(indptr[0]), int(indptr[-1])
        data = np.asarray(self._data[first:last])
        indices = np.asarray(self._indices[first:last])
        return sp.csr_matrix((data, indices, indptr - first), shape=(stop - start, self.n_vars))

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
            return block.astype(np.float32, copy=False).toarray()
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
