"""SCVI's latent space and the evaluation of its fit, the methods of scvi-tools' VAEMixin (functions of the model,
`self`, bound in SCVI's class body): the ELBO, the reconstruction error and the marginal likelihood (read minibatch by
minibatch over the counts: plans.per_cell), the latent representation, the aggregated posterior and differential
abundance.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from scvi_scale.model import analyses, compat, docs, output_plans
from scvi_scale.model.plans import OutputCall, execute, per_cell


def device(self) -> torch.device:
    """Where the module is."""
    return next(self.module.parameters()).device


# --- evaluation: minibatch by minibatch, over the counts -----------------------------------------------------------


@docs.fill
def get_elbo(
    self,
    adata=None,
    indices=None,
    batch_size: int | None = None,
    dataloader=None,
    return_mean: bool = True,
    data_loader_kwargs: dict | None = None,
    **kwargs,
) -> float | np.ndarray:
    """The ELBO, reconstruction log-likelihood minus KL (higher is better, as scvi-tools returns it).

    Parameters
    ----------
    {adata}
    {indices}
    {batch_size}
    {dataloader}
    {return_mean}
    {data_loader_kwargs}
    {loader_kwargs}

    Returns
    -------
    float or np.ndarray
        The mean, or the ELBO per cell (n_cells,).
    """

    def elbo_per_cell(tensors):
        losses = self.module.loss(tensors)
        return -(losses["reconstruction_loss"] + losses["kl_local"])

    options = {**(data_loader_kwargs or {}), **kwargs}
    call = OutputCall("get_elbo", adata, indices, batch_size, options=options, dataloader=dataloader)
    elbo = per_cell(self, call, elbo_per_cell)
    return float(elbo.mean()) if return_mean else elbo


@docs.fill
def get_reconstruction_error(
    self,
    adata=None,
    indices=None,
    batch_size: int | None = None,
    dataloader=None,
    return_mean: bool = True,
    data_loader_kwargs: dict | None = None,
    **kwargs,
) -> dict:
    """-log p(x | z), as scvi-tools.

    Parameters
    ----------
    {adata}
    {indices}
    {batch_size}
    {dataloader}
    {return_mean}
    {data_loader_kwargs}
    {loader_kwargs}

    Returns
    -------
    dict
        {"reconstruction_loss": the mean over cells, or per cell (n_cells,)}.
    """
    options = {**(data_loader_kwargs or {}), **kwargs}
    call = OutputCall("get_reconstruction_error", adata, indices, batch_size, options=options, dataloader=dataloader)
    loss = per_cell(self, call, lambda tensors: self.module.loss(tensors)["reconstruction_loss"])
    return {"reconstruction_loss": float(loss.mean()) if return_mean else loss}


@docs.fill
def get_marginal_ll(
    self,
    adata=None,
    indices=None,
    n_mc_samples: int = 1000,
    batch_size: int | None = None,
    return_mean: bool = True,
    dataloader=None,
    data_loader_kwargs: dict | None = None,
    **kwargs,
) -> float | np.ndarray:
    """Importance-sampled estimate of log p(x) (higher is better).

    Parameters
    ----------
    {adata}
    {indices}
    n_mc_samples
        Importance samples per cell (n_mc_samples_per_pass in kwargs: how many are decoded at once).
    {batch_size}
    {return_mean}
    {dataloader}
    {data_loader_kwargs}
    {loader_kwargs}

    Returns
    -------
    float or np.ndarray
        The mean over cells, or per cell (n_cells,).
    """
    per_pass = int(kwargs.pop("n_mc_samples_per_pass", 1))
    options = {**(data_loader_kwargs or {}), **kwargs}
    call = OutputCall("get_marginal_ll", adata, indices, batch_size, options=options, dataloader=dataloader)
    ll = per_cell(
        self,
        call,
        lambda tensors: self.module.marginal_ll(tensors, n_mc_samples=n_mc_samples, n_mc_samples_per_pass=per_pass),
    )
    return float(ll.mean()) if return_mean else ll


# --- latent space ------------------------------------------------------------------------------------------------


@docs.fill
def get_latent_representation(
    self,
    adata=None,
    indices=None,
    give_mean: bool = True,
    mc_samples: int = 5000,
    batch_size: int | None = None,
    return_dist: bool = False,
    dataloader=None,
    *,
    write_to: str | None = None,
    **kwargs,
):
    """The posterior of z per cell; draws are keyed by seed and cell (a cell gets the same values whatever else is
    computed with it).

    Parameters
    ----------
    {adata}
    {indices}
    give_mean, mc_samples
        The mean (for latent_distribution "ln", from mc_samples draws); False: one draw per cell.
    {batch_size}
    return_dist
        Return the mean and the variance of q(z | x).
    {dataloader}
    {write_to}
        Here obsm/<key> (and with return_dist the variance, obsm/<key>_var).
    {output_kwargs}

    Returns
    -------
    np.ndarray or tuple of np.ndarray
        (n_cells, n_latent) float32, or (mean, variance); lazy arrays when written to a store.
    """
    return execute(
        self,
        OutputCall("get_latent_representation", adata, indices, batch_size, options=kwargs, dataloader=dataloader),
        output_plans.latent(self, give_mean, mc_samples, return_dist, write_to),
    )


def write_latent_representation(self, key: str = "X_scvi", **kwargs):
    """get_latent_representation(write_to=key, **kwargs) of every cell.

    Parameters
    ----------
    key
        obsm/<key> (and obsm/<key>_var with return_dist).
    **kwargs
        get_latent_representation's.
    """
    return self.get_latent_representation(write_to=key, **kwargs)


@docs.fill
def get_aggregated_posterior(
    self, adata=None, indices=None, batch_size: int | None = None, dof: float | None = 3.0
) -> torch.distributions.Distribution:
    """The cells' aggregated posterior, as scvi-tools: an equal-weight mixture of their q(z | x).

    Parameters
    ----------
    {adata}
    {indices}
    {batch_size}
    dof
        The Student's t components' degrees of freedom (None: Normal components).

    Returns
    -------
    torch.distributions.Distribution
        A MixtureSameFamily over n_latent dimensions.
    """
    loc, variance = self.get_latent_representation(adata, indices, batch_size=batch_size, return_dist=True)
    return analyses.aggregated_posterior(loc, variance, dof, self.device)


@docs.fill
def differential_abundance(
    self,
    adata=None,
    adata_sub=None,
    sample_key: str | None = None,
    batch_size: int = 128,
    num_cells_posterior: int | None = None,
    dof: float | None = None,
    dataloader=None,
    seed: int = 0,
) -> pd.DataFrame:
    """Log density of each cell of adata_sub under each sample's aggregated posterior, as scvi-tools.

    Parameters
    ----------
    adata, adata_sub
        The cells of the posteriors, and those whose densities are computed (default: adata).
    sample_key
        The obs column of the samples (required).
    {batch_size}
    num_cells_posterior, seed
        A sample's posterior is of at most this many of its cells, picked with `seed`.
    dof
        As get_aggregated_posterior's.
    {dataloader}

    Returns
    -------
    pd.DataFrame
        cells x samples, also put in adata_sub.obsm["da_log_probs"] for an AnnData.
    """
    compat.refuse("differential_abundance", dataloader=dataloader)
    if sample_key is None:
        raise ValueError("differential_abundance needs sample_key, the obs column of the samples")
    return analyses.differential_abundance(
        self, adata, adata_sub, sample_key, batch_size, num_cells_posterior, dof, seed
    )
