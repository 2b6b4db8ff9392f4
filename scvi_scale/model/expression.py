"""SCVI's outputs in gene space, the methods of scvi-tools' RNASeqMixin (functions of the model, `self`, bound in
SCVI's class body): the library size, the decoded expression, the likelihood's parameters, posterior predictive
counts, gene-gene correlation and differential expression. Each method checks scvi-tools' arguments and hands one plan
(output_plans.py) to plans.execute.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import pandas as pd

from scvi_scale.model import compat, docs, output_plans
from scvi_scale.model.plans import OutputCall, execute
from scvi_scale.outputs import differential
from scvi_scale.outputs.importance import ImportanceOptions

IMPORTANCE_KEYS = tuple(field.name for field in dataclasses.fields(ImportanceOptions))
DE_KEYS = (
    "n_samples_overall",
    "use_permutation",
    "m_permutation",
    "pseudocounts",
    "threshold_counts",
    "test_mode",
    "max_sample_bytes",
)


@docs.fill
def get_latent_library_size(
    self,
    adata=None,
    indices=None,
    give_mean: bool = True,
    batch_size: int | None = None,
    dataloader=None,
    *,
    write_to: str | None = None,
    **kwargs,
) -> np.ndarray:
    """The library size l_n per cell.

    Parameters
    ----------
    {adata}
    {indices}
    give_mean
        The mean of q(l | x) (a model with a latent library); False: exp of the observed or sampled log library.
    {batch_size}
    {dataloader}
    {write_to}
        Here obsm/<key>.
    {output_kwargs}

    Returns
    -------
    np.ndarray
        (n_cells, 1).
    """
    return execute(
        self,
        OutputCall("get_latent_library_size", adata, indices, batch_size, options=kwargs, dataloader=dataloader),
        output_plans.library_size(self, give_mean, write_to),
    )


@docs.fill
def get_normalized_expression(
    self,
    adata=None,
    indices=None,
    transform_batch=None,
    gene_list=None,
    library_size: float | Literal["latent"] = 1,
    n_samples: int = 1,
    n_samples_overall: int | None = None,
    weights: Literal["uniform", "importance"] | None = None,
    batch_size: int | None = None,
    return_mean: bool = True,
    return_numpy: bool | None = None,
    silent: bool = True,
    dataloader=None,
    data_loader_kwargs: dict | None = None,
    *,
    write_to: str | None = None,
    dtype: Literal["float32", "float16"] = "float32",
    **kwargs,
):
    """The decoded expression, px_scale times library_size ("latent": px_rate): as scvi-tools, a DataFrame
    (cells x genes) unless return_numpy, (n_samples, n_cells, n_genes) for n_samples > 1 without return_mean.

    Parameters
    ----------
    {adata}
    {indices}
    {transform_batch}
    {gene_list}
    library_size
        The library px_scale is scaled to ("latent": each cell's).
    {n_samples}
    n_samples_overall, weights
        (n_samples_overall, n_genes) draws over the cells instead, picked uniformly or by importance weight
        (max_cells, truncation, n_mc_samples, n_mc_samples_per_pass in kwargs).
    {batch_size}
    return_mean
        The mean of the draws (False: each).
    return_numpy
        An array, not a DataFrame.
    {silent}
    {dataloader}
    {data_loader_kwargs}
    {write_to}
        Here layers/<key> (n_obs, n_vars), or with gene_list obsm/<key> (the names in its attributes).
    dtype
        Of written and returned values ("float16": half the bytes, 3 significant digits).
    {output_kwargs}

    Returns
    -------
    pd.DataFrame or np.ndarray
        See above; a lazy array when written to a store.
    """
    importance = ImportanceOptions(**{key: kwargs.pop(key) for key in IMPORTANCE_KEYS if key in kwargs})
    options = {**(data_loader_kwargs or {}), **kwargs}
    call = OutputCall("get_normalized_expression", adata, indices, batch_size, silent, options, dataloader)
    plan = output_plans.normalized_expression(
        self,
        transform_batch,
        gene_list,
        library_size,
        n_samples,
        n_samples_overall,
        weights,
        return_mean,
        return_numpy,
        write_to,
        dtype,
        importance,
    )
    return execute(self, call, plan)


@docs.fill
def get_likelihood_parameters(
    self,
    adata=None,
    indices=None,
    n_samples: int = 1,
    give_mean: bool = False,
    batch_size: int | None = None,
    dataloader=None,
    *,
    write_to: str | None = None,
    **kwargs,
) -> dict:
    """The parameters of the counts' likelihood per cell and gene.

    Parameters
    ----------
    {adata}
    {indices}
    {n_samples}
    give_mean
        The mean of the draws (False: each).
    {batch_size}
    {dataloader}
    {write_to}
        Here layers/<key>_mean, <key>_dispersions, <key>_dropout.
    {output_kwargs}

    Returns
    -------
    dict
        {"mean": px_rate, "dispersions": theta (NB, ZINB), "dropout": sigmoid(zi_logits) (ZINB)}, (n_cells, n_genes)
        each, or (n_samples, n_cells, n_genes) for n_samples > 1 without give_mean.
    """
    return execute(
        self,
        OutputCall("get_likelihood_parameters", adata, indices, batch_size, options=kwargs, dataloader=dataloader),
        output_plans.likelihood_parameters(self, n_samples, give_mean, write_to),
    )


@docs.fill
def posterior_predictive_sample(
    self,
    adata=None,
    indices=None,
    transform_batch=None,
    n_samples: int = 1,
    gene_list=None,
    batch_size: int | None = None,
    dataloader=None,
    silent: bool = True,
    *,
    write_to: str | None = None,
    **kwargs,
):
    """Counts drawn from p(x_hat | x): a draw of q(z, l | x), then of the fitted NB / ZINB / Poisson.

    Parameters
    ----------
    {adata}
    {indices}
    {transform_batch}
    {n_samples}
    {gene_list}
        Not when written.
    {batch_size}
    {dataloader}
    {silent}
    {write_to}
        Here layers/<key> (or <key>_0 ... for n_samples > 1), CSR.
    {output_kwargs}

    Returns
    -------
    sparse.GCXS or list
        As scvi-tools, (n_cells, n_genes), or (n_cells, n_genes, n_samples) for n_samples > 1; written to a
        store, its lazy CSR arrays (one, or a list).
    """
    return execute(
        self,
        OutputCall("posterior_predictive_sample", adata, indices, batch_size, silent, kwargs, dataloader),
        output_plans.posterior_predictive(self, transform_batch, n_samples, gene_list, write_to),
    )


@docs.fill
def get_feature_correlation_matrix(
    self,
    adata=None,
    indices=None,
    n_samples: int = 10,
    batch_size: int = 64,
    rna_size_factor: int = 1000,
    transform_batch=None,
    correlation_type: Literal["spearman", "pearson"] = "spearman",
    silent: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Gene-gene correlation of scvi-tools' denoised samples (jobs.DenoisedJob), over cells and draws. Holds the
    draws in memory: subset cells with indices on a large store.

    Parameters
    ----------
    {adata}
    {indices}
    {n_samples}
    {batch_size}
    rna_size_factor
        The library the draws are scaled to.
    {transform_batch}
        A list: a correlation per batch, averaged.
    correlation_type
        Spearman's or Pearson's.
    {silent}
    seed
        The draws' seed.

    Returns
    -------
    pd.DataFrame
        genes x genes.
    """
    return execute(
        self,
        OutputCall("get_feature_correlation_matrix", adata, indices, batch_size, silent, {"seed": seed}),
        output_plans.feature_correlation(self, n_samples, rna_size_factor, transform_batch, correlation_type),
    )


@docs.fill
def differential_expression(
    self,
    adata=None,
    groupby: str | None = None,
    group1=None,
    group2=None,
    idx1=None,
    idx2=None,
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float = 0.25,
    batch_size: int | None = None,
    all_stats: bool = True,
    batch_correction: bool = False,
    batchid1=None,
    batchid2=None,
    fdr_target: float = 0.05,
    silent: bool = False,
    weights: Literal["uniform", "importance"] | None = "uniform",
    filter_outlier_cells: bool = False,
    importance_weighting_kwargs: dict | None = None,
    dataloader=None,
    *,
    write_to: str | None = None,
    table_path=None,
    **kwargs,
) -> pd.DataFrame:
    """scVI's Bayesian differential expression (vanilla: Lopez et al. 2018; change: Boyeau et al. 2019) as
    scvi-tools': one DataFrame indexed by gene, a block of rows per comparison, its columns and row order.

    Parameters
    ----------
    {adata}
    groupby, group1, group2, idx1, idx2
        obs[groupby] (also a column added after set-up) values group1 against group2 (or the rest), or cells.
    mode, delta, all_stats, batch_correction, batchid1, batchid2, fdr_target, weights, filter_outlier_cells,
    importance_weighting_kwargs
        scvi-tools' (see outputs/differential.py: the cells are gathered in bounded memory).
    {batch_size}
    {silent}
    {dataloader}
    write_to, table_path
        Also write the table as uns/<key> of the store (or AnnData), and as a .csv (or .parquet: pyarrow) file
        of exactly that path; refused before the work when it exists, unless overwrite.
    {output_kwargs}
        Also get_bayes_factors' options (n_samples_overall, use_permutation, m_permutation, pseudocounts,
        test_mode), threshold_counts and max_sample_bytes.

    Returns
    -------
    pd.DataFrame
    """
    de_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in DE_KEYS}
    compat.explain_ignored(
        "differential_expression",
        [key for key in ("change_fn", "m1_domain_fn", "cred_interval_lvls") if kwargs.pop(key, None) is not None],
        "the change and domain functions are scvi-tools' defaults (log fold change, |lfc| >= delta)",
    )
    call = OutputCall("differential_expression", adata, None, batch_size, silent, kwargs, dataloader)
    options = differential.DEOptions(
        mode=mode,
        delta=delta,
        all_stats=all_stats,
        batch_correction=batch_correction,
        batchid1=batchid1,
        batchid2=batchid2,
        fdr_target=fdr_target,
        weights=weights or "uniform",
        filter_outlier_cells=filter_outlier_cells,
        importance=ImportanceOptions(**(importance_weighting_kwargs or {})),
        **de_kwargs,
    )
    comparison = dict(groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2)
    plan = output_plans.differential_expression(self, comparison, options, write_to, table_path)
    return execute(self, call, plan)
