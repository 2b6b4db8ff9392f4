"""The walk every output method shares (model/plans.py), the same for each method: scvi-tools' data loader is
refused, a misspelt keyword is a TypeError naming it, a data-loader argument is explained by a warning and ignored
(the values equal those of the call without it)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from scvi_scale import SCVI
from scvi_scale.model import compat

CALLS = {  # method -> the arguments of a small call
    "get_latent_representation": {},
    "get_latent_library_size": {"give_mean": False},
    "get_normalized_expression": {"return_numpy": True},
    "get_likelihood_parameters": {},
    "posterior_predictive_sample": {},
    "get_elbo": {"return_mean": False},
}


@pytest.fixture(scope="module")
def model():
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    adata = anndata.AnnData(sp.csr_matrix(rng.poisson(2.0, (60, 12)).astype(np.float32)))
    adata.obs["batch"] = ["a", "b"] * 30
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_latent=2, n_hidden=8)


@pytest.mark.parametrize("method", sorted(CALLS))
def test_a_data_loader_is_refused(model, method):
    with pytest.raises(NotImplementedError, match="dataloader"):
        getattr(model, method)(dataloader=object(), **CALLS[method])


@pytest.mark.parametrize("method", sorted(CALLS))
def test_a_misspelt_keyword_is_a_type_error_and_a_data_loader_argument_a_warning(model, method):
    if method != "get_elbo":  # get_elbo's **kwargs are data-loader arguments only
        with pytest.raises(TypeError, match="batchsize"):
            getattr(model, method)(batchsize=8, **CALLS[method])
    # get_elbo draws from torch's generator, the outputs by their seed
    seeded = {} if method == "get_elbo" else {"seed": 3}
    compat._explained.discard((method, "num_workers"))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="num_workers"):
        warned = getattr(model, method)(num_workers=2, **seeded, **CALLS[method])
    torch.manual_seed(0)
    plain = getattr(model, method)(**seeded, **CALLS[method])
    if isinstance(plain, dict):
        assert plain.keys() == warned.keys()
        for name in plain:
            np.testing.assert_array_equal(plain[name], warned[name])
    elif hasattr(plain, "todense"):
        np.testing.assert_array_equal(plain.todense(), warned.todense())
    else:
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(warned))


def test_an_output_over_an_anndata_is_refused_for_dask_workers(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="dask workers need a store"):
            model.get_latent_representation(client=object())
