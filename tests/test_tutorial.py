"""A scvi-tools tutorial, line for line, on real data, with only the import changed.

The lines between the two "tutorial" markers are scvi-tools' own usage (its quick-start and scArches tutorials,
1.5): `from scvi_scale import SCVI` stands where the tutorial has `import scvi` and `scvi.model.SCVI`. The data
preparation around them (no scanpy here) picks variable genes and clusters with numpy, as the tutorial does with
scanpy. The assertions check behaviour against the data, not only shapes. Real data: ../shared/data/cellbench_3cl.h5ad
(3 lung cancer cell lines on 2 platforms), skipped when absent.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from scvi_scale import SCVI

CELLBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cellbench_3cl.h5ad"
pytestmark = pytest.mark.skipif(not CELLBENCH.exists(), reason="../shared/data/cellbench_3cl.h5ad is absent")
N_TOP_GENES = 1000


def variable_genes(adata, n_top: int) -> pd.Index:
    """The n_top genes of largest variance of log1p counts per 10k (what sc.pp.highly_variable_genes selects,
    roughly; the tutorial's step before setup)."""
    counts = adata.X.toarray()
    normalized = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    return adata.var_names[np.argsort(normalized.var(0))[::-1][:n_top]]


def kmeans(points: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means: cluster labels, standing in for the tutorial's sc.tl.leiden on the latent."""
    rng = np.random.default_rng(seed)
    centres = points[rng.choice(len(points), k, replace=False)]
    for _ in range(50):
        labels = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([points[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
    return labels


def knn_accuracy(points: np.ndarray, labels: np.ndarray, reference: np.ndarray, reference_labels, k: int = 15):
    distances = ((points[:, None] - reference[None]) ** 2).sum(-1)
    neighbours = np.argsort(distances, axis=1)[:, :k]
    votes = [pd.Series(reference_labels[row]).mode()[0] for row in neighbours]
    return float(np.mean(np.asarray(votes) == labels))


@pytest.fixture(scope="module")
def adata(tmp_path_factory):
    path = tmp_path_factory.mktemp("tutorial") / "cellbench.h5ad"
    shutil.copy(CELLBENCH, path)
    data = anndata.read_h5ad(path)
    return data[:, variable_genes(data, N_TOP_GENES)].copy()


def test_the_quick_start_tutorial_runs_and_its_outputs_hold(adata, tmp_path):
    warnings.simplefilter("ignore", UserWarning)  # the tutorial's Lightning arguments are explained by warnings
    # --- tutorial ---------------------------------------------------------------------------------------------
    adata.layers["counts"] = adata.X.copy()
    SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = SCVI(adata, n_layers=2, n_latent=10, gene_likelihood="nb")
    model.view_anndata_setup()
    model.train(
        max_epochs=40,
        early_stopping=True,
        check_val_every_n_epoch=1,
        plan_kwargs={"lr": 1e-3},
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
    )
    history = model.history
    SCVI_LATENT_KEY = "X_scVI"
    adata.obsm[SCVI_LATENT_KEY] = model.get_latent_representation()
    latent_again = model.get_latent_representation(adata)
    adata.obs["leiden"] = pd.Categorical(kmeans(adata.obsm[SCVI_LATENT_KEY], 4).astype(str))  # added after setup
    SCVI_NORMALIZED_KEY = "scvi_normalized"
    adata.layers[SCVI_NORMALIZED_KEY] = model.get_normalized_expression(library_size=10e4)
    genes = list(adata.var_names[:10])
    denoised = model.get_normalized_expression(
        adata, indices=np.arange(50), gene_list=genes, transform_batch="celseq2", n_samples=5, library_size=1e4
    )
    de_leiden = model.differential_expression(groupby="leiden", n_samples_overall=1000)
    de_change = model.differential_expression(groupby="cell_line", group1="H1975", mode="change", batch_correction=True)
    de_uniform = model.differential_expression(groupby="cell_line", group1="H1975", n_samples_overall=500)
    de_importance = model.differential_expression(
        groupby="cell_line",
        group1="H1975",
        weights="importance",
        importance_weighting_kwargs={"max_cells": 64, "n_mc_samples": 20},
        n_samples_overall=500,
    )
    elbo = model.get_elbo()
    reconstruction = model.get_reconstruction_error()
    marginal_ll = model.get_marginal_ll(n_mc_samples=20)
    samples = model.posterior_predictive_sample(n_samples=3)
    parameters = model.get_likelihood_parameters(indices=np.arange(100))
    correlation = model.get_feature_correlation_matrix(indices=np.arange(100), n_samples=2, correlation_type="pearson")
    one_draw = model.get_latent_representation(give_mean=False)
    mean, variance = model.get_latent_representation(return_dist=True)
    model.save(tmp_path / "model", save_anndata=True, overwrite=True)
    loaded = SCVI.load(tmp_path / "model", adata=adata)
    loaded.to_device("cpu")
    # --- end of tutorial ---------------------------------------------------------------------------------------
    for key in (
        "train_loss",
        "elbo_train",
        "reconstruction_loss_train",
        "kl_local_train",
        "kl_global_train",
        "validation_loss",
        "elbo_validation",
        "reconstruction_loss_validation",
        "kl_local_validation",
        "kl_global_validation",
    ):
        assert key in history and len(history[key]) >= 1, key
    latent = adata.obsm[SCVI_LATENT_KEY]
    assert latent.shape == (adata.n_obs, 10)
    np.testing.assert_array_equal(latent_again, latent)
    cell_lines = adata.obs["cell_line"].to_numpy()
    assert knn_accuracy(latent, cell_lines, latent, cell_lines) > 0.85
    np.testing.assert_allclose(adata.layers[SCVI_NORMALIZED_KEY].sum(1), 10e4, rtol=1e-3)
    assert denoised.shape == (50, 10) and list(denoised.columns) == genes
    assert set(de_leiden["group1"]) == set(adata.obs["leiden"].cat.categories)
    # change mode: the top genes' lfc sign is the sign of their raw normalized mean ratio
    top = de_change.sort_values("proba_de", ascending=False).head(20)
    raw_sign = np.sign(np.log(top["raw_normalized_mean1"] + 1e-4) - np.log(top["raw_normalized_mean2"] + 1e-4))
    assert (np.sign(top["lfc_mean"]) == raw_sign).mean() > 0.8 and "is_de_fdr_0.05" in de_change

    # importance weights re-weigh the group's posterior draws: its mean expression moves, but stays that group's
    def log_scale(frame, column):
        return np.log(frame.loc[adata.var_names, column].to_numpy())

    weighted = log_scale(de_importance, "scale1")
    own, rest = log_scale(de_uniform, "scale1"), log_scale(de_uniform, "scale2")
    assert np.corrcoef(weighted, own)[0, 1] > np.corrcoef(weighted, rest)[0, 1] and not np.allclose(weighted, own)
    assert marginal_ll > elbo and reconstruction["reconstruction_loss"] > -elbo * 0.5
    assert samples.shape == (adata.n_obs, N_TOP_GENES, 3)
    observed = np.asarray(adata.layers["counts"].mean(0)).ravel()
    assert np.corrcoef(np.log1p(samples.todense().mean((0, 2))), np.log1p(observed))[0, 1] > 0.9
    library = np.asarray(adata.layers["counts"][:100].sum(1)).ravel()
    np.testing.assert_allclose(parameters["mean"].sum(1), library, rtol=1e-3)
    assert correlation.shape == (N_TOP_GENES, N_TOP_GENES)
    np.testing.assert_allclose(np.diag(correlation.to_numpy()), 1.0, rtol=1e-5)
    assert one_draw.shape == latent.shape and not np.allclose(one_draw, latent)
    np.testing.assert_allclose(mean, latent) and np.all(variance > 0)
    np.testing.assert_allclose(loaded.get_latent_representation(), latent, rtol=1e-6)


def test_the_scarches_tutorial_maps_a_query_anndata(adata):
    warnings.simplefilter("ignore", UserWarning)
    reference = adata[adata.obs["batch"] == "celseq2"].copy()
    query = adata[adata.obs["batch"] == "dropseq"].copy()
    missing = list(query.var_names[::10])  # another panel: 10% of the reference's genes absent, another order
    query = query[:, [name for name in query.var_names[::-1] if name not in set(missing)]].copy()
    # --- tutorial ---------------------------------------------------------------------------------------------
    SCVI.setup_anndata(reference, batch_key="batch")
    vae_ref = SCVI(
        reference,
        n_layers=2,
        encode_covariates=True,
        deeply_inject_covariates=False,
        use_layer_norm="both",
        use_batch_norm="none",
    )
    vae_ref.train(max_epochs=60, accelerator="cpu", enable_progress_bar=False)
    SCVI.prepare_query_anndata(query, vae_ref)
    vae_q = SCVI.load_query_data(query, vae_ref)
    vae_q.train(max_epochs=40, plan_kwargs={"weight_decay": 0.0}, accelerator="cpu", enable_progress_bar=False)
    query.obsm["X_scVI"] = vae_q.get_latent_representation()
    # --- end of tutorial ---------------------------------------------------------------------------------------
    assert list(query.var_names) == list(reference.var_names)  # padded and reordered in place
    padded = query[:, missing]
    assert not any(
        np.asarray(m.todense() if hasattr(m, "todense") else m).any() for m in [padded.X, *padded.layers.values()]
    )
    reference_latent = vae_q.get_latent_representation(reference)
    accuracy = knn_accuracy(
        query.obsm["X_scVI"], query.obs["cell_line"].to_numpy(), reference_latent, reference.obs["cell_line"].to_numpy()
    )
    assert accuracy > 0.8
