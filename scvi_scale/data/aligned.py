"""A query store read with a reference model's genes, in the reference's order, without rewriting the store.

    >>> query = AlignedStore("query.zarr", reference_var_names)     # CountStore-like, n_vars = the reference's
    >>> block = query.read_csr(0, 4096)                             # columns mapped onto the reference genes

Reference genes the query lacks read as zeros (a warning says how many; under 80% of the reference's genes it
leads with scvi-tools' warning of poor mapping); query genes the reference lacks are dropped. Each block is remapped
as it is read, so a query larger than memory maps too.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.data.store import CountStore, StoreError

logger = logging.getLogger("scvi_scale.data")

MIN_SHARED_GENE_FRACTION = 0.8  # below this share of the reference genes scvi-tools warns of poor mapping


def shared_genes(query_var_names, reference_var_names) -> int:
    """How many of the reference's genes the query has."""
    return len(pd.Index(query_var_names).intersection(pd.Index(reference_var_names)))


def missing_genes_message(n_shared: int, n_reference: int, filled: str) -> tuple[str, bool]:
    """(what to tell of a query holding n_shared of the reference's n_reference genes, the rest `filled`; whether
    that is under 80%, where scvi-tools warns of poor mapping and its sentence leads). The text is empty when no
    gene is missing."""
    n_missing = n_reference - n_shared
    if n_missing == 0:
        return "", False
    fraction = n_shared / n_reference
    text = (
        f"{n_missing} of the reference's {n_reference} genes are missing from the query and {filled}; the "
        f"query has {n_shared} ({fraction:.1%}) of the reference genes"
    )
    poor = fraction < MIN_SHARED_GENE_FRACTION
    if poor:
        text = (
            f"Query data contains less than {MIN_SHARED_GENE_FRACTION:.0%} of reference var names. This may "
            f"result in poor performance. {text}"
        )
    return text, poor


class AlignedStore(CountStore):
    """A query store read with the reference's genes, in the reference's order; the store itself is not changed.

    n_vars, shape and var_names are the reference's; every block read (read_raw, read_csr, read_dense, to_dask)
    has its columns mapped: reference gene j reads query column `query_columns[j]`, or zeros where that is -1.
    query_var_names holds the store's own genes. Pickles as (path, layer, reference genes).
    """

    def __init__(self, path, reference_var_names, layer: str | None = None):
        self._reference_var_names = None  # the store's own genes until the alignment below is set
        super().__init__(path, layer=layer)
        self.query_var_names = CountStore.var_names.func(self)  # type: ignore[attr-defined]  # a cached_property
        reference = pd.Index([str(name) for name in reference_var_names])
        if reference.has_duplicates:
            duplicated = list(reference[reference.duplicated()][:5])
            raise StoreError(f"the reference has duplicated var names, e.g. {duplicated}")
        self.query_columns = self.query_var_names.get_indexer(reference).astype(np.int64)
        n_shared = int(np.count_nonzero(self.query_columns >= 0))
        if n_shared == 0:
            raise StoreError(
                f"{self.path}: none of its {len(self.query_var_names)} genes is among the reference's "
                f"{len(reference)} genes (e.g. {list(reference[:3])}); are they named the same way?"
            )
        n_dropped = len(self.query_var_names) - n_shared
        message, _ = missing_genes_message(n_shared, len(reference), "read as zeros")
        if message:
            warnings.warn(f"{self.path}: {message}", UserWarning, stacklevel=2)
        if n_dropped:
            logger.info("%s: %d query genes not in the reference are dropped", self.path, n_dropped)
        # query column -> reference column (-1: dropped), for remapping CSR column indices
        self.reference_columns = np.full(len(self.query_var_names), -1, dtype=np.int64)
        present = np.flatnonzero(self.query_columns >= 0)
        self.reference_columns[self.query_columns[present]] = present
        self._reference_var_names = reference
        self.n_vars = len(reference)
        self.shape = (self.n_obs, self.n_vars)

    @property
    def var_names(self) -> pd.Index:
        if self._reference_var_names is None:
            return CountStore.var_names.func(self)  # type: ignore[attr-defined]  # a cached_property
        return self._reference_var_names

    @property
    def is_identity(self) -> bool:
        """True when the query has exactly the reference genes in the reference order (blocks pass unchanged)."""
        return len(self.query_var_names) == self.n_vars and bool(
            np.array_equal(self.query_columns, np.arange(self.n_vars))
        )

    def __getstate__(self):
        return {"path": self.path, "layer": self.layer, "reference_var_names": list(self.var_names)}

    def __setstate__(self, state):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # warned once already, in the process that aligned it
            self.__init__(state["path"], state["reference_var_names"], layer=state["layer"])  # type: ignore[misc]  # unpickling

    def __repr__(self) -> str:
        return f"Aligned{super().__repr__()[:-1]}, aligned to {self.n_vars} reference genes)"

    def var_frame(self) -> pd.DataFrame:
        return super().var_frame().reindex(self._reference_var_names)

    def read_raw(self, start: int, stop: int):
        """Rows [start, stop) with the reference's columns, in the stored dtype (CSR or dense as stored)."""
        block = super().read_raw(start, stop)
        if self.is_identity:
            return block
        if isinstance(block, np.ndarray):
            aligned = np.zeros((block.shape[0], self.n_vars), dtype=block.dtype)
            present = np.flatnonzero(self.query_columns >= 0)
            aligned[:, present] = block[:, self.query_columns[present]]
            return aligned
        columns = self.reference_columns[block.indices]
        kept = columns >= 0
        kept_before = np.concatenate([[0], np.cumsum(kept)])
        aligned = sp.csr_matrix(
            (block.data[kept], columns[kept].astype(block.indices.dtype), kept_before[block.indptr]),
            shape=(block.shape[0], self.n_vars),
        )
        aligned.sort_indices()  # the reorder scrambles each row's column order; CSR consumers want it sorted
        return aligned
