"""An AnnData (in memory or backed) read like a CountStore: counts by row blocks, obs and var from the live object.

    >>> source = AnnDataSource(adata)                  # or AnnDataSource(adata, layer="counts")
    >>> block = source.read_csr(0, 1024)              # scipy CSR float32 rows of adata.X, no copy of the rest
    >>> source.obs_column("leiden")                   # a column added after setup is seen

Nothing is copied or written: the counts are sliced from adata.X (or the layer) block by block, whatever holds
them (a numpy array, a scipy CSR matrix, a backed h5ad dataset), and obs is read from the AnnData at each call, so
an obs column added after `SCVI.setup_anndata` (clusters computed on the latent) is there for
`differential_expression(groupby=...)`. A CSC matrix cannot be sliced by rows cheaply: it is converted to CSR once,
in memory, with a warning. In-memory counts are read in small blocks (IN_MEMORY_BLOCK_ROWS rows: slicing is
cheap, so the training shuffle comes close to a uniform one); backed ones in blocks of BACKED_BLOCK_ROWS.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.data.store import CountStore, StoreError

IN_MEMORY_BLOCK_ROWS = 64
BACKED_BLOCK_ROWS = 4096


class AnnDataSource(CountStore):
    """The counts (X or `layer`), obs and var of a live AnnData, with CountStore's reading interface.

    path is a label for messages ("AnnData(n_obs x n_vars)"), not a file: outputs of a model over an AnnData go
    into the AnnData itself (obsm, layers, uns), or into a store written from it.
    """

    def __init__(self, adata, layer: str | None = None):
        self.adata = adata
        self.layer = layer
        if layer is None:
            counts = adata.X
            if counts is None:
                raise StoreError(f"the AnnData has no X; pass layer= one of its layers {list(adata.layers.keys())}")
        elif layer not in adata.layers:
            raise StoreError(f"the AnnData has no layer {layer!r}; its layers are {list(adata.layers.keys())}")
        else:
            counts = adata.layers[layer]
        if sp.issparse(counts) and counts.format == "csc":
            warnings.warn(
                "the AnnData's counts are CSC, which cannot be read by rows: they are converted to CSR in memory "
                "(convert them once with adata.X = adata.X.tocsr() to avoid the copy)",
                UserWarning,
                stacklevel=3,
            )
            counts = counts.tocsr()
        self._matrix = counts
        self.is_sparse = sp.issparse(counts) or getattr(counts, "format", None) in ("csr", "csc")
        self.shape = (int(adata.n_obs), int(adata.n_vars))
        self.n_obs, self.n_vars = self.shape
        if self.n_obs == 0 or self.n_vars == 0:
            raise StoreError(f"the AnnData is empty: shape {self.shape}")
        if tuple(counts.shape) != self.shape:
            raise StoreError(f"the AnnData's counts have shape {tuple(counts.shape)}, its obs x var {self.shape}")
        self.path = f"AnnData({self.n_obs} x {self.n_vars})"
        backed = getattr(adata, "isbacked", False)
        self.chunk_rows = max(1, min(BACKED_BLOCK_ROWS if backed else IN_MEMORY_BLOCK_ROWS, self.n_obs))
        duplicated = self.var_names[self.var_names.duplicated()]
        if len(duplicated):
            raise StoreError(
                f"{self.path}: {len(duplicated)} duplicated var names, e.g. {list(duplicated[:5])}; "
                "make them unique (AnnData.var_names_make_unique) first"
            )

    def __getstate__(self):
        raise TypeError(
            "a model over an in-memory AnnData cannot send it to dask workers; write it to a Zarr store "
            "(scvi_scale.data.write_store(adata, 'cells.zarr')) and use the store"
        )

    def __repr__(self) -> str:
        kind = "CSR" if self.is_sparse else "dense"
        layer = "" if self.layer is None else f", layer={self.layer!r}"
        return f"AnnDataSource({self.path}{layer}, {kind}, chunk_rows={self.chunk_rows})"

    @property
    def var_names(self) -> pd.Index:
        return self.adata.var_names

    @property
    def obs_names(self) -> pd.Index:
        return self.adata.obs_names

    def obs_name_hashes(self) -> np.ndarray:
        return pd.util.hash_array(self.obs_names.to_numpy(dtype=object))

    def obs_keys(self) -> list[str]:
        return list(self.adata.obs.columns)

    def obs_column(self, key: str) -> pd.Series:
        if key not in self.adata.obs.columns:
            raise StoreError(f"{self.path}: obs has no column {key!r}; its columns are {self.obs_keys()}")
        return self.adata.obs[key].reset_index(drop=True)  # by row position, as CountStore.obs_column

    def var_frame(self) -> pd.DataFrame:
        return self.adata.var

    def read_raw(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Rows [start, stop) in the stored value dtype: scipy CSR for sparse counts, a numpy array for dense."""
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"row range [{start}, {stop}) is outside [0, {self.n_obs}) of {self.path}")
        block = self._matrix[start:stop]
        if self.is_sparse:
            return block if isinstance(block, sp.csr_matrix) else sp.csr_matrix(block)
        return np.asarray(block)
