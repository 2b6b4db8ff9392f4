"""Query mapping (scArches; the methods of scvi-tools' ArchesMixin, bound in SCVI's class body): a query made ready
for a reference (scvi-tools' prepare_query_anndata, or a store aligned on the fly) and the query model holding the
reference's weights (load_query_data).

    >>> SCVI.prepare_query_anndata(query, "reference_model/")        # in place: the reference's genes, in order
    >>> SCVI.load_query_data(query, "reference_model/")

A query from another lab or platform rarely has the reference's gene panel. The reference's genes it lacks are
padded with zeros, its own genes are dropped and the rest are put in the reference's order, in X and in every layer.
A query Zarr store gets the same alignment without a rewrite (data.AlignedStore, SCVI.prepare_query_zarr).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from typing import TypeVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale import persist, surgery
from scvi_scale.data import StoreError
from scvi_scale.data.aligned import AlignedStore, missing_genes_message, shared_genes
from scvi_scale.model import compat, docs, saving, sources, training

logger = logging.getLogger("scvi_scale.model")

ModelT = TypeVar("ModelT")  # SCVI, as saving.ModelT


def prepare_query_anndata(adata, reference_model, return_reference_var_names: bool = False, inplace: bool = True):
    """scvi-tools' prepare_query_anndata: the query with exactly the reference's genes, in its order. Missing genes
    become zero columns in X and every layer (format and dtype kept), the query's own are dropped; obs, obsm, obsp,
    uns and raw are kept. ValueError when no gene is shared; a warning under 80% of them. For a store:
    prepare_query_zarr.

    Parameters
    ----------
    adata
        The query AnnData.
    reference_model
        A model or a model directory, ours or scvi-tools'.
    return_reference_var_names
        Return the reference's var names and touch nothing.
    inplace
        Change `adata` itself (scvi-tools' default); False returns a new AnnData.

    Returns
    -------
    None, anndata.AnnData or pd.Index
    """
    var_names = pd.Index(reference(reference_model).var_names)
    if return_reference_var_names:
        return var_names
    return pad_and_sort(adata, var_names, inplace)


def prepare_query_zarr(cls, query_path, reference, layer: str | None = None) -> AlignedStore:
    """The query store read with the reference's genes: missing ones as zeros (warned, with how many), extra ones
    dropped, in the reference's order; nothing is rewritten.

    Parameters
    ----------
    query_path
        The query store.
    reference
        A model or a model directory.
    layer
        The counts' layer (default: the reference's).

    Returns
    -------
    AlignedStore
    """
    return aligned_store(query_path, reference, layer)


@docs.fill
def load_query_data(
    cls: type[ModelT],
    adata=None,
    reference_model=None,
    registry: dict | None = None,
    inplace_subset_query_vars: bool = False,
    accelerator: str = "auto",
    device: int | str = "auto",
    unfrozen: bool = False,
    freeze_dropout: bool = False,
    freeze_expression: bool = True,
    freeze_decoder_first_layer: bool = True,
    freeze_batchnorm_encoder: bool = True,
    freeze_batchnorm_decoder: bool = False,
    freeze_classifier: bool = True,
    transfer_batch: bool = True,
    datamodule=None,
) -> ModelT:
    """A model over the query with the reference's weights, its batch encoding extended, ready to train.

    Parameters
    ----------
    adata
        An AnnData with the reference's genes (prepare_query_anndata), or a store (aligned on the fly), with
        the reference's batch column (labels only for dispersion "gene-label").
    reference_model
        A model or a directory written by SCVI.save (ours or scvi-tools').
    inplace_subset_query_vars
        Subset an AnnData with extra genes to the reference's, in place.
    {accelerator}
    {device}
    unfrozen, freeze_dropout, freeze_expression, freeze_decoder_first_layer, freeze_batchnorm_encoder,
    freeze_batchnorm_decoder
        scvi-tools' freezing (surgery.py); unfrozen=True trains everything.
    freeze_classifier, transfer_batch, registry
        SCANVI's and SYSVI's (no use for SCVI); registry is refused.
    {datamodule}

    Returns
    -------
    SCVI
    """
    compat.refuse("load_query_data", datamodule=datamodule, registry=registry)
    freeze = dict(
        unfrozen=unfrozen,
        freeze_dropout=freeze_dropout,
        freeze_expression=freeze_expression,
        freeze_decoder_first_layer=freeze_decoder_first_layer,
        freeze_batchnorm_encoder=freeze_batchnorm_encoder,
        freeze_batchnorm_decoder=freeze_batchnorm_decoder,
    )
    return query_model(
        cls,
        adata,
        reference_model,
        inplace_subset_query_vars=inplace_subset_query_vars,
        device=training.resolve_device(accelerator, device),
        freeze=freeze,
    )


def reference(model_or_dir) -> persist.SavedModel:
    """A reference for query mapping: a model directory (read) or a model (its saved form)."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        return persist.read_model(model_or_dir)
    return saving.saved_form(model_or_dir)


def aligned_store(query_path, reference_model, layer: str | None) -> AlignedStore:
    """The query store read with the reference's genes in order (missing ones as zeros); layer: default the
    reference's."""
    saved = reference(reference_model)
    return AlignedStore(query_path, saved.var_names, layer=saved.registry.layer if layer is None else layer)


def query_model(cls, adata, reference_model, *, inplace_subset_query_vars: bool, device, freeze: dict):
    """A `cls` (SCVI) over the query `adata` (an AnnData or a store) holding the reference's weights, its batch
    encoding extended by the query's batches, frozen as `freeze` (surgery.freeze_for_query's options) says, on
    `device`, in eval mode."""
    if reference_model is None:
        raise ValueError("Please provide a reference model as string or loaded model.")
    saved = reference(reference_model)
    reference_registry = saved.registry
    if reference_registry.batch_key is None:
        raise StoreError(
            "the reference was set up without a batch_key: scArches maps query batches through the batch "
            "covariate, so train the reference with one"
        )
    if inplace_subset_query_vars and sources.is_anndata(adata):
        adata._inplace_subset_var(pd.Index(saved.var_names).intersection(adata.var_names))
    query = sources.query_source(adata, saved.var_names, reference_registry.layer)
    if saved.init_params.get("dispersion") != "gene-label":
        # labels only feed the "gene-label" dispersion: the query need not have them (codes read as 0)
        reference_registry = dataclasses.replace(reference_registry, labels_key=None)
    query_registry = reference_registry.extend_batches(query)
    if sources.is_anndata(adata):
        sources.remember_anndata_setup(adata, query_registry)
    model = cls(adata if sources.is_anndata(adata) else query, registry=query_registry, **saved.init_params)
    surgery.transfer_reference_weights(model.module, saved.module_state, reference_registry.n_batch)
    surgery.freeze_for_query(model.module, reference_registry.n_batch, **freeze)
    model.module.to(device).eval()
    return model


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
