"""A query AnnData made ready for mapping onto a reference (scArches): scvi-tools' prepare_query_anndata.

    >>> SCVI.prepare_query_anndata(query, "reference_model/")        # in place: the reference's genes, in order
    >>> SCVI.load_query_data(query, "reference_model/")

A query from another lab or platform rarely has the reference's gene panel. The reference's genes it lacks are
padded with zeros, its own genes are dropped and the rest are put in the reference's order, in X and in every layer.
A query Zarr store gets the same alignment without a rewrite (data.AlignedStore, SCVI.prepare_query_zarr).
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.data.aligned import missing_genes_message, shared_genes

logger = logging.getLogger("scvi_scale.model")


def pad_and_sort(adata, reference_var_names, inplace: bool):
    """The query `adata` with exactly `reference_var_names` (a sequence of G names), in that order.

    Reference genes the query lacks become columns of zeros in X and in each layer (their var columns NaN); genes
    of the query's own are dropped; obs, obsm, obsp, uns and raw are kept. inplace=True changes the caller's
    AnnData (when padding, it is rebuilt in place as scvi-tools does) and returns None; inplace=False returns a new
    AnnData (n_obs, G) and leaves the caller's as it was. Raises ValueError when no gene is shared; warns when
    fewer than 80% of the reference's genes are in the query (scvi-tools' warning, with the numbers).
    """
    import anndata

    reference = pd.Index([str(name) for name in reference_var_names])
    n_shared = shared_genes(adata.var_names, reference)
    if n_shared == 0:
        raise ValueError(
            "No reference var names found in query data. Please rerun with return_reference_var_names=True to see "
            f"reference var names. (The query's {adata.n_vars} genes, e.g. {list(adata.var_names[:3])}, share none "
            f"with the reference's {len(reference)}, e.g. {list(reference[:3])}.)"
        )
    message, poor = missing_genes_message(n_shared, len(reference), "padded with zeros")
    if poor:
        warnings.warn(message, UserWarning, stacklevel=3)
    elif message:
        logger.info("%s", message)
    missing = reference.difference(adata.var_names)
    if len(missing) == 0:
        if inplace:
            if not reference.equals(adata.var_names):
                adata._inplace_subset_var(reference)
            return None
        return adata[:, reference].copy()
    if adata.isbacked:
        raise ValueError(
            f"the query is a backed AnnData ({adata.filename}) lacking {len(missing)} reference genes: padding it "
            "would load it whole; write it as a store (scvi_scale.data.write_store) and map it with "
            "SCVI.prepare_query_zarr, which reads the missing genes as zeros"
        )
    padding = anndata.AnnData(
        X=_zeros_like(adata.X, adata.n_obs, len(missing)),
        layers={name: _zeros_like(layer, adata.n_obs, len(missing)) for name, layer in adata.layers.items()},
        obs=pd.DataFrame(index=adata.obs_names),
        var=pd.DataFrame(index=missing),
    )
    # anndata.concat joins var, varm and layers as scvi-tools' padding does; uns and raw it drops, so they are
    # carried over by hand (a query's colours or raw counts are not the padding's business)
    padded = anndata.concat([adata, padding], axis=1, join="outer", index_unique=None, merge="unique")
    padded._inplace_subset_var(reference)
    padded.uns = adata.uns if inplace else copy.deepcopy(adata.uns)
    if adata.raw is not None:
        padded.raw = adata.raw.to_adata()
    if not inplace:
        return padded
    adata._init_as_actual(padded)
    return None


def _zeros_like(matrix, n_obs: int, n_vars: int):
    """Zeros (n_obs, n_vars) stored as `matrix` is (CSR / CSC / dense) and of its dtype, so padding keeps each
    matrix's format and dtype (scvi-tools' padding turns every padded matrix into CSR float64)."""
    if sp.issparse(matrix):
        return sp.csr_matrix((n_obs, n_vars), dtype=matrix.dtype).asformat(matrix.format)
    return np.zeros((n_obs, n_vars), dtype=np.asarray(matrix[:0]).dtype)
