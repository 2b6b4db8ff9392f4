"""Several count stores read as one, without concatenating anything on disk.

An atlas often comes as many files. `StoreCollection` puts their cells one after the other (store 0's rows first)
and reads them through the same interface as one `CountStore`, so the Registry, the samplers and the outputs take
it unchanged:

    >>> atlas = StoreCollection(["study_a.zarr", "study_b.zarr", "study_c.zarr"], label="study")
    >>> atlas.n_obs, atlas.n_vars                  # all cells; the genes of every store (join="inner")
    >>> block = atlas.read_csr(0, 4096)            # float32 CSR in the joined gene order, stitched across stores
    >>> stores, local = atlas.locate(rows)         # where each row lives, to write results back into its store

Genes are joined as `anndata.concat` joins them: "inner" (default) keeps the genes of every store (the first store's
order), "outer" the genes of any store (pandas' sorted union), a missing gene reading as zero (anndata fills zeros
for sparse data too); or `var_names=` gives the genes, in order, onto which every store is mapped (missing ones
zeros, others dropped: a reference's genes for query mapping). Each store's columns are mapped onto the joined
order block by block as they are read (`_map_columns`); nothing is rewritten.

obs: the columns every store has ("inner") or any store has ("outer", NaN where missing), concatenated as
`anndata.concat` does (categorical columns get the union of their categories, natural-sorted); `label=` adds a
categorical column naming each cell's store (`keys`, default "0", "1", ...), e.g. to give batches per store.
var_frame: the var of the joined genes as `anndata.concat(..., merge="first")` makes it.

Blocks: `block_bounds` restarts at every store's first row, so a block never straddles two stores and stays aligned
with the store's own chunks; a row range read across a boundary is stitched from both stores.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
from natsort import natsorted

from scvi_scale.data.store import CountStore, StoreError

# imported where used: importing anndata (which imports dask) costs ~1 s of a process's start
if TYPE_CHECKING:
    import dask.array as da

JOINS = ("inner", "outer")


def _joined_var_names(stores: list[CountStore], join: str) -> pd.Index:
    """anndata.concat's gene index: pandas' intersection (first store's order) or union (sorted) of the stores'."""
    joined = stores[0].var_names
    for store in stores[1:]:
        joined = joined.intersection(store.var_names) if join == "inner" else joined.union(store.var_names)
    return joined


def _unified_dtype(dtypes: list, has_missing: bool):
    """The dtype anndata.concat gives an obs column from the stores' dtypes (None: leave it to pandas' concat).

    Categoricals: the union of the categories, natural-sorted, unordered; ordered ones only stay ordered when they
    all have the same categories (else object). Booleans with missing values: pandas' nullable boolean.
    """
    if any(isinstance(dtype, pd.CategoricalDtype) for dtype in dtypes):
        if not all(isinstance(dtype, pd.CategoricalDtype) for dtype in dtypes):
            return None
        categories = functools.reduce(lambda a, b: a.union(b), (dtype.categories for dtype in dtypes))
        if not any(dtype.ordered for dtype in dtypes):
            return pd.CategoricalDtype(natsorted(categories), ordered=False)
        with_categories = [dtype for dtype in dtypes if len(dtype.categories)]
        if with_categories and all(
            dtype.ordered and len(dtype.categories) == len(categories) and np.all(dtype.categories == categories)
            for dtype in with_categories
        ):
            return with_categories[0]
        return object
    if has_missing and all(pd.api.types.is_bool_dtype(dtype) for dtype in dtypes):
        return pd.BooleanDtype()
    return None


def _map_columns(block, columns: np.ndarray, n_vars: int, sorted_after: bool):
    """A block of one store (CSR or dense, stored dtype) with its columns moved to the joined order.

    columns: (store genes,) int64, each store column's joined position or -1 (dropped). Joined genes the store
    lacks are zero. sorted_after: the kept columns keep their relative order, so CSR rows stay sorted.
    """
    if isinstance(block, np.ndarray):
        mapped = np.zeros((block.shape[0], n_vars), dtype=block.dtype)
        kept = np.flatnonzero(columns >= 0)
        mapped[:, columns[kept]] = block[:, kept]
        return mapped
    moved = columns[block.indices]
    kept = moved >= 0
    if kept.all():
        data, indices, indptr = block.data, moved, block.indptr
    else:
        kept_before = np.concatenate([[0], np.cumsum(kept)])
        data, indices, indptr = block.data[kept], moved[kept], kept_before[block.indptr]
    mapped = sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=(block.shape[0], n_vars))
    if not sorted_after:
        mapped.sort_indices()  # CSR consumers (and scipy's fast paths) want each row's columns in order
    return mapped


class StoreCollection:
    """Count stores read as one store of their concatenated cells; see the module docstring.

    stores: paths or CountStores (opened with `layer`), in the order their cells are concatenated. join: "inner"
    or "outer" (ignored when var_names is given). var_names: the genes to read, in order, instead of a join.
    label, keys: an obs column `label` naming each cell's store by keys[store] (default "0", "1", ...).

    Attributes, as CountStore's: n_obs, n_vars, shape, is_sparse (any store is CSR: blocks are then CSR),
    chunk_rows (the smallest of the stores'), var_names, obs_names, layer; path (for messages: the stores' paths
    joined by " + "; a collection has no single path). Also: stores (the CountStores), paths, offsets (n_stores
    + 1,) int64 (store s holds rows [offsets[s], offsets[s + 1])), store_columns (per store: each of its columns'
    joined position or -1), store_index (per cell: its store). Thread-safe for reading; pickles as its arguments.
    is_remote: whether any store is at a URL (the samplers then read more blocks at once).
    """

    def __init__(
        self,
        stores: Sequence,
        join: str = "inner",
        layer: str | None = None,
        *,
        var_names: Sequence[str] | None = None,
        label: str | None = None,
        keys: Sequence[str] | None = None,
    ):
        if isinstance(stores, (str, os.PathLike)):
            raise TypeError("stores must be a list of stores or paths, not a single path")
        if len(stores) == 0:
            raise StoreError("a StoreCollection needs at least one store")
        if join not in JOINS:
            raise ValueError(f"join={join!r}: expected one of {JOINS}")
        self.stores = [store if isinstance(store, CountStore) else CountStore(store, layer=layer) for store in stores]
        layers = {store.layer for store in self.stores}
        if layers != {layer}:
            raise ValueError(f"layer={layer!r}, but the CountStores given read layers {sorted(map(str, layers))}")
        self.paths = [store.path for store in self.stores]
        self.layer = layer
        self.join = join
        self.path = " + ".join(self.paths)
        self.label = label
        self.keys = [str(index) for index in range(len(self.stores))] if keys is None else [str(k) for k in keys]
        if len(self.keys) != len(self.stores) or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"keys must name each of the {len(self.stores)} stores once, got {list(self.keys)}")
        self._given_var_names = None if var_names is None else [str(name) for name in var_names]

        if var_names is not None:
            self.var_names = pd.Index(self._given_var_names)
            if self.var_names.has_duplicates:
                duplicated = list(self.var_names[self.var_names.duplicated()][:5])
                raise StoreError(f"var_names has duplicated genes, e.g. {duplicated}")
        else:
            self.var_names = _joined_var_names(self.stores, join)
        self.n_vars = len(self.var_names)
        if self.n_vars == 0:
            raise StoreError(
                f"{self.path}: the stores share no gene, so an inner join leaves none; "
                f"use join='outer' or check that the genes are named the same way"
            )
        self.store_columns = [self.var_names.get_indexer(store.var_names).astype(np.int64) for store in self.stores]
        for store, columns in zip(self.stores, self.store_columns):
            if not np.any(columns >= 0):
                raise StoreError(
                    f"{store.path}: none of its {store.n_vars} genes is among the {self.n_vars} genes read "
                    f"(e.g. {list(self.var_names[:3])}); are they named the same way?"
                )
        self._identity = [
            store.n_vars == self.n_vars and np.array_equal(columns, np.arange(self.n_vars))
            for store, columns in zip(self.stores, self.store_columns)
        ]
        self._sorted_after = [bool(np.all(np.diff(columns[columns >= 0]) > 0)) for columns in self.store_columns]

        self.offsets = np.concatenate([[0], np.cumsum([store.n_obs for store in self.stores])]).astype(np.int64)
        self.n_obs = int(self.offsets[-1])
        self.shape = (self.n_obs, self.n_vars)
        self.is_sparse = any(store.is_sparse for store in self.stores)
        self.is_remote = any(store.is_remote for store in self.stores)
        self.chunk_rows = min(store.chunk_rows for store in self.stores)
        if label is not None and any(label in store.obs_keys() for store in self.stores):
            raise ValueError(f"label={label!r} is already an obs column of a store; choose another name")

    # --- pickling and description ------------------------------------------------------------------------------

    def __getstate__(self):
        return {
            "paths": self.paths,
            "join": self.join,
            "layer": self.layer,
            "var_names": self._given_var_names,
            "label": self.label,
            "keys": self.keys,
        }

    def __setstate__(self, state):
        self.__init__(  # type: ignore[misc]  # unpickling rebuilds through __init__
            state["paths"],
            state["join"],
            state["layer"],
            var_names=state["var_names"],
            label=state["label"],
            keys=state["keys"],
        )

    def __repr__(self) -> str:
        kind = "CSR" if self.is_sparse else "dense"
        join = "given genes" if self._given_var_names is not None else f"join={self.join!r}"
        return f"StoreCollection({len(self.stores)} stores: {self.n_obs} x {self.n_vars} {kind}, {join})"

    def describe(self) -> dict:
        """What a registry records about the collection (JSON-serialisable): the join and every source store."""
        return {
            "join": "given" if self._given_var_names is not None else self.join,
            "layer": self.layer,
            "label": self.label,
            "n_obs": self.n_obs,
            "n_vars": self.n_vars,
            "stores": [
                {
                    "path": store.path,
                    "key": key,
                    "first_row": int(first),
                    "n_obs": store.n_obs,
                    "n_vars": store.n_vars,
                    "n_genes_read": int(np.count_nonzero(columns >= 0)),
                    "n_genes_dropped": int(np.count_nonzero(columns < 0)),
                    "n_genes_missing": self.n_vars - int(np.count_nonzero(columns >= 0)),
                }
                for store, key, first, columns in zip(self.stores, self.keys, self.offsets, self.store_columns)
            ],
        }

    # --- where rows live ---------------------------------------------------------------------------------------

    def locate(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(store index, row within that store), both int64 (n,), of collection rows (n,)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_obs):
            bad = rows.min() if rows.min() < 0 else rows.max()
            raise IndexError(f"row {bad} is outside [0, {self.n_obs}) of {self!r}")
        stores = np.searchsorted(self.offsets, rows, side="right") - 1
        return stores, rows - self.offsets[stores]

    @functools.cached_property
    def store_index(self) -> np.ndarray:
        """(n_obs,) int16 (int32 past 32,767 stores): the store each cell comes from."""
        dtype = np.int16 if len(self.stores) <= np.iinfo(np.int16).max else np.int32
        return np.repeat(np.arange(len(self.stores), dtype=dtype), np.diff(self.offsets))

    # --- obs and var -------------------------------------------------------------------------------------------

    @functools.cached_property
    def obs_names(self) -> pd.Index:
        return pd.Index(np.concatenate([store.obs_names.to_numpy() for store in self.stores]))

    def obs_name_hashes(self) -> np.ndarray:
        hashes = np.empty(self.n_obs, dtype=np.uint64)
        for store, first in zip(self.stores, self.offsets):
            hashes[first : first + store.n_obs] = store.obs_name_hashes()
        return hashes

    def obs_keys(self) -> list[str]:
        """The obs columns, as anndata.concat orders them (pandas' concat of the stores' columns), then `label`."""
        columns = pd.concat([pd.DataFrame(columns=store.obs_keys()) for store in self.stores], join=self.join).columns
        return list(columns) + ([self.label] if self.label is not None else [])

    def obs_column(self, key: str) -> pd.Series:
        """One obs column over all cells, indexed by row position (as CountStore.obs_column), its values as
        anndata.concat would build them (see module)."""
        if key not in self.obs_keys():
            raise StoreError(f"{self.path}: obs has no column {key!r}; the collection's columns are {self.obs_keys()}")
        if key == self.label:
            values = pd.Categorical.from_codes(self.store_index, categories=self.keys)
            return pd.Series(values, name=key)
        parts = [
            store.obs_column(key).reset_index(drop=True).to_frame()
            if key in store.obs_keys()
            else pd.DataFrame(index=pd.RangeIndex(store.n_obs))  # outer join: NaN
            for store in self.stores
        ]
        dtypes = [part[key].dtype for part in parts if key in part]
        dtype = _unified_dtype(dtypes, has_missing=len(dtypes) < len(parts))
        if dtype is not None:
            parts = [part.astype({key: dtype}) if key in part else part for part in parts]
        return pd.concat(parts, join="outer", ignore_index=True)[key]

    def var_frame(self) -> pd.DataFrame:
        """var of the joined genes: each column from the first store that has it (anndata's merge="first")."""
        frames = [store.var_frame().reindex(self.var_names) for store in self.stores]
        columns: dict[str, pd.Series] = {}
        for frame in frames:
            for column in frame.columns:
                columns.setdefault(column, frame[column])
        return pd.DataFrame(columns, index=self.var_names)

    # --- counts ------------------------------------------------------------------------------------------------

    def read_raw(self, start: int, stop: int):
        """Rows [start, stop) in the joined genes, in the stored dtype (promoted across stores): scipy CSR when
        is_sparse, else a numpy array. A range across stores is read from each and stitched."""
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"row range [{start}, {stop}) is outside [0, {self.n_obs}) of {self!r}")
        first = min(int(np.searchsorted(self.offsets, start, side="right")) - 1, len(self.stores) - 1)
        parts: list[sp.csr_matrix | np.ndarray] = []
        for index in range(first, len(self.stores)):
            low, high = max(start, self.offsets[index]), min(stop, self.offsets[index + 1])
            if parts and low >= high:
                break
            local = int(low - self.offsets[index]), int(max(low, high) - self.offsets[index])
            parts.append(self._in_joined_genes(index, self.stores[index].read_raw(*local)))
        if len(parts) == 1:
            return parts[0]
        return sp.vstack(parts, format="csr") if self.is_sparse else np.concatenate(parts)

    def _in_joined_genes(self, index: int, block):
        """A block read from store `index` with its columns in the joined genes; CSR when the collection is."""
        if not self._identity[index]:
            block = _map_columns(block, self.store_columns[index], self.n_vars, self._sorted_after[index])
        return sp.csr_matrix(block) if self.is_sparse and isinstance(block, np.ndarray) else block

    def read_csr(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as float32 CSR, (stop - start, n_vars)."""
        block = self.read_raw(start, stop)
        return (block if sp.issparse(block) else sp.csr_matrix(block)).astype(np.float32, copy=False)

    def read_dense(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a float32 numpy array, (stop - start, n_vars)."""
        block = self.read_raw(start, stop)
        return (block.toarray() if sp.issparse(block) else block).astype(np.float32, copy=False)

    def block_bounds(self, block_rows: int | None = None) -> np.ndarray:
        """Row boundaries of blocks of block_rows rows (default: each store's chunk_rows) that restart at every
        store's first row: [0, b, 2b, ..., n_0, n_0 + b, ..., n_obs]. No block straddles two stores."""
        if block_rows is not None and int(block_rows) < 1:
            raise ValueError(f"block_rows must be at least 1, got {block_rows}")
        bounds = [store.block_bounds(block_rows)[:-1] + first for store, first in zip(self.stores, self.offsets)]
        return np.concatenate(bounds + [np.array([self.n_obs], dtype=np.int64)])

    def to_dask(self) -> da.Array:
        """The counts as a lazy float32 dask array (n_obs, n_vars): the stores' own dask views (one chunk per
        chunk_rows rows of each store, the chunks of block_bounds()) with their columns mapped, one after the other."""
        import dask.array as da

        meta = sp.csr_matrix((0, 0), dtype=np.float32) if self.is_sparse else np.empty((0, 0), dtype=np.float32)
        parts = []
        for index, store in enumerate(self.stores):
            lazy = store.to_dask()
            parts.append(
                lazy.map_blocks(  # type: ignore[call-arg]  # dask types the method as da.map_blocks
                    functools.partial(self._in_joined_genes, index),  # type: ignore[arg-type]
                    chunks=(lazy.chunks[0], (self.n_vars,)),
                    dtype=np.float32,
                    meta=meta,
                )
            )
        return da.concatenate(parts, axis=0)
