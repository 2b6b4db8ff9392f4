"""Values, not shapes: scvi-scale's outputs against scvi-tools' own, recorded on the very same weights.

tests/fixtures/scvi_tools/outputs.npz and options/ were recorded by scvi-tools 1.5.1
(benchmarks/make_scvi_tools_fixture.py --outputs); scvi-tools is not needed here. Deterministic quantities (raw-count
statistics, latent means, decoded rates at them) must agree to float32 rounding; Monte Carlo ones (averages over
posterior draws, Bayes factors) within their sampling error, which the tolerances below allow with margin:
normalized expression averaged over 400 draws per cell has a relative standard error near 1% per entry.
"""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

from scvi_scale import SCVI
from scvi_scale.module import to_tensors
from scvi_scale.outputs import jobs
from scvi_scale.sampler import SequentialSampler

FIXTURE = Path(__file__).parent / "fixtures" / "scvi_tools"


@pytest.fixture(scope="module")
def recorded():
    return dict(np.load(FIXTURE / "outputs.npz"))


@pytest.fixture(scope="module")
def model():
    return SCVI.load(FIXTURE / "model", anndata.read_h5ad(FIXTURE / "data.h5ad"))


def test_normalized_expression_and_likelihood_parameters_match(model, recorded):
    ours = model.get_normalized_expression(n_samples=400, return_numpy=True, seed=1)
    theirs = recorded["normalized_mean"]
    np.testing.assert_allclose(ours.mean(0), theirs.mean(0), rtol=0.02)  # per gene, over cells: ~0.1% error
    assert np.median(np.abs(ours - theirs) / theirs) < 0.02
    parameters = model.get_likelihood_parameters(n_samples=200, give_mean=True, seed=1)
    for name in ("mean", "dropout", "dispersions"):
        expected = recorded[f"likelihood_{name}"]
        np.testing.assert_allclose(parameters[name].mean(0), expected.mean(0), rtol=0.03, err_msg=name)
    np.testing.assert_allclose(model.get_latent_library_size(give_mean=True), recorded["library_mean"], rtol=1e-4)


def test_importance_weights_are_scvi_tools_weights_on_the_same_draws(model, recorded):
    """scvi-tools' get_importance_weights on recorded draws, recomputed by jobs.ImportanceJob from the same inputs
    (draws, their px, the anchors' posteriors, counts and log p(x))."""
    zs = torch.as_tensor(recorded["importance_zs"])  # (S, B, L)
    n_draws, n_cells = zs.shape[:2]

    def flat(name):  # (S, B, ...) -> (S * B, ...) draw after draw, scvi-tools' order
        value = torch.as_tensor(recorded[name])
        return value.reshape(n_draws * n_cells, *value.shape[2:])

    x = torch.as_tensor(recorded["importance_x"])
    anchors = {
        "x": x,
        "library": x.sum(-1),
        "qz_loc": torch.as_tensor(recorded["importance_qz_loc"]),
        "qz_scale": torch.as_tensor(recorded["importance_qz_scale"]),
        "log_px": torch.as_tensor(recorded["importance_log_px"]),
    }
    outputs = {
        "px_scale": flat("importance_scale")[None],
        "theta": flat("importance_theta")[None],
        "zi_logits": flat("importance_zi_logits")[None],
    }
    log_weights = jobs.ImportanceJob._log_weights(model.module, flat("importance_zs"), outputs, anchors)
    probabilities = torch.softmax(log_weights.double(), 0).numpy()
    np.testing.assert_allclose(probabilities, recorded["importance_probabilities"], atol=1e-5)


def test_importance_weighted_expression_moves_as_scvi_tools_does(model, recorded):
    """End to end the weighted mean is a Monte Carlo estimate dominated by a few draws (scvi-tools' own weights have
    an effective sample size near 16 of 4,000 here, and log p(x) of the anchors varies by tens of nats between
    runs of 500 draws), so only its direction is compared: the shift from the uniform mean."""
    group = recorded["group"]
    weighted = model.get_normalized_expression(
        indices=group, n_samples_overall=4000, weights="importance", return_numpy=True, seed=2
    ).mean(0)
    uniform = model.get_normalized_expression(indices=group, n_samples_overall=4000, return_numpy=True, seed=2).mean(0)
    theirs, theirs_uniform = recorded["importance_mean"], recorded["uniform_group_mean"]
    np.testing.assert_allclose(uniform, theirs_uniform, rtol=0.05)
    assert np.corrcoef(weighted - uniform, theirs - theirs_uniform)[0, 1] > 0.7


def test_differential_expression_statistics_match(model, recorded):
    vanilla = model.differential_expression(groupby="cell_type", group1="type_0", n_samples_overall=20000, seed=3).loc[
        model.var_names
    ]
    for column in (
        "raw_mean1",
        "raw_mean2",
        "non_zeros_proportion1",
        "non_zeros_proportion2",
        "raw_normalized_mean1",
        "raw_normalized_mean2",
    ):
        np.testing.assert_allclose(vanilla[column].to_numpy(), recorded[f"de_{column}"], rtol=1e-5, err_msg=column)
    for column in ("scale1", "scale2"):
        np.testing.assert_allclose(vanilla[column].to_numpy(), recorded[f"de_{column}"], rtol=0.03, err_msg=column)
    np.testing.assert_allclose(vanilla["proba_m1"].to_numpy(), recorded["de_proba_m1"], atol=0.03)
    change = model.differential_expression(
        groupby="cell_type", group1="type_0", mode="change", n_samples_overall=20000, seed=3
    ).loc[model.var_names]
    np.testing.assert_allclose(change["lfc_mean"].to_numpy(), recorded["de_change_lfc_mean"], atol=0.05)
    np.testing.assert_allclose(change["lfc_median"].to_numpy(), recorded["de_change_lfc_median"], atol=0.05)
    np.testing.assert_allclose(change["proba_de"].to_numpy(), recorded["de_change_proba_de"], atol=0.05)


@pytest.mark.parametrize("name", ["embedding", "log_variational_false", "softplus_variance", "extra_kwargs", "normal"])
def test_module_options_load_with_scvi_tools_values(name):
    """Each model was trained by scvi-tools with the option; ours loads it and gives its latent means and its
    px_rate (px loc for the normal likelihood) at them."""
    folder = FIXTURE / "options" / name
    data = anndata.read_h5ad(folder / "data.h5ad" if (folder / "data.h5ad").exists() else FIXTURE / "data.h5ad")
    model = SCVI.load(folder, data)
    expected = np.load(folder / "expected.npz")
    np.testing.assert_allclose(model.get_latent_representation(), expected["latent"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        minibatch = next(iter(SequentialSampler(model.store, batch_size=data.n_obs, obs_arrays=model.obs_arrays)))
        tensors = to_tensors(minibatch, "cpu")
        inference = model.module.inference(tensors)
        rate = model.module.generative(inference["qz"].loc, inference["library"], tensors)["px_rate"]
    np.testing.assert_allclose(rate.numpy(), expected["px_rate"], rtol=1e-4, atol=1e-5 * expected["px_rate"].max())
