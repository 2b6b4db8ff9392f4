"""Every parameter of scvi-tools' SCVI methods is accepted by ours, in the same position and with the same default.

The list below was recorded from scvi-tools 1.5.1's own signatures (inspect.signature on scvi.model.SCVI, in the
peer environment; see benchmarks/make_scvi_tools_fixture.py for how that environment is made), for the methods
scvi-scale has too. REQUIRED marks a parameter without a default. Keyword arguments scvi-tools takes through
**kwargs are checked by calling (test_keyword_arguments_scvi_tools_passes_through_kwargs_are_accepted).
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

from scvi_scale import SCVI

REQUIRED = object()
SCVI_TOOLS_1_5_1 = {  # method -> [(parameter, default)], in order
    "__init__": [
        ("adata", None),
        ("registry", None),
        ("n_hidden", 128),
        ("n_latent", 10),
        ("n_layers", 1),
        ("dropout_rate", 0.1),
        ("dispersion", "gene"),
        ("gene_likelihood", "zinb"),
        ("use_observed_lib_size", True),
        ("latent_distribution", "normal"),
    ],
    "setup_anndata": [
        ("adata", REQUIRED),
        ("layer", None),
        ("batch_key", None),
        ("labels_key", None),
        ("size_factor_key", None),
        ("categorical_covariate_keys", None),
        ("continuous_covariate_keys", None),
    ],
    "train": [
        ("max_epochs", None),
        ("accelerator", "auto"),
        ("devices", "auto"),
        ("train_size", None),
        ("validation_size", None),
        ("shuffle_set_split", True),
        ("load_sparse_tensor", False),
        ("batch_size", 128),
        ("early_stopping", False),
        ("datasplitter_kwargs", None),
        ("plan_config", None),
        ("plan_kwargs", None),
        ("datamodule", None),
        ("trainer_config", None),
    ],
    "get_elbo": [
        ("adata", None),
        ("indices", None),
        ("batch_size", None),
        ("dataloader", None),
        ("return_mean", True),
        ("data_loader_kwargs", None),
    ],
    "get_reconstruction_error": [
        ("adata", None),
        ("indices", None),
        ("batch_size", None),
        ("dataloader", None),
        ("return_mean", True),
        ("data_loader_kwargs", None),
    ],
    "get_marginal_ll": [
        ("adata", None),
        ("indices", None),
        ("n_mc_samples", 1000),
        ("batch_size", None),
        ("return_mean", True),
        ("dataloader", None),
        ("data_loader_kwargs", None),
    ],
    "get_latent_representation": [
        ("adata", None),
        ("indices", None),
        ("give_mean", True),
        ("mc_samples", 5000),
        ("batch_size", None),
        ("return_dist", False),
        ("dataloader", None),
    ],
    "get_latent_library_size": [
        ("adata", None),
        ("indices", None),
        ("give_mean", True),
        ("batch_size", None),
        ("dataloader", None),
    ],
    "get_normalized_expression": [
        ("adata", None),
        ("indices", None),
        ("transform_batch", None),
        ("gene_list", None),
        ("library_size", 1),
        ("n_samples", 1),
        ("n_samples_overall", None),
        ("weights", None),
        ("batch_size", None),
        ("return_mean", True),
        ("return_numpy", None),
        ("silent", True),
        ("dataloader", None),
        ("data_loader_kwargs", None),
    ],
    "get_likelihood_parameters": [
        ("adata", None),
        ("indices", None),
        ("n_samples", 1),
        ("give_mean", False),
        ("batch_size", None),
        ("dataloader", None),
    ],
    "posterior_predictive_sample": [
        ("adata", None),
        ("indices", None),
        ("transform_batch", None),
        ("n_samples", 1),
        ("gene_list", None),
        ("batch_size", None),
        ("dataloader", None),
        ("silent", True),
    ],
    "get_feature_correlation_matrix": [
        ("adata", None),
        ("indices", None),
        ("n_samples", 10),
        ("batch_size", 64),
        ("rna_size_factor", 1000),
        ("transform_batch", None),
        ("correlation_type", "spearman"),
        ("silent", True),
    ],
    "differential_expression": [
        ("adata", None),
        ("groupby", None),
        ("group1", None),
        ("group2", None),
        ("idx1", None),
        ("idx2", None),
        ("mode", "vanilla"),
        ("delta", 0.25),
        ("batch_size", None),
        ("all_stats", True),
        ("batch_correction", False),
        ("batchid1", None),
        ("batchid2", None),
        ("fdr_target", 0.05),
        ("silent", False),
        ("weights", "uniform"),
        ("filter_outlier_cells", False),
        ("importance_weighting_kwargs", None),
        ("dataloader", None),
    ],
    "get_aggregated_posterior": [("adata", None), ("indices", None), ("batch_size", None), ("dof", 3.0)],
    "differential_abundance": [
        ("adata", None),
        ("adata_sub", None),
        ("sample_key", None),
        ("batch_size", 128),
        ("num_cells_posterior", None),
        ("dof", None),
        ("dataloader", None),
    ],
    "minify_adata": [
        ("minified_data_type", "latent_posterior_parameters"),
        ("use_latent_qzm_key", "X_latent_qzm"),
        ("use_latent_qzv_key", "X_latent_qzv"),
    ],
    "save": [
        ("dir_path", REQUIRED),
        ("prefix", None),
        ("overwrite", False),
        ("save_anndata", False),
        ("save_kwargs", None),
        ("legacy_mudata_format", False),
        ("datamodule", None),
    ],
    "load": [
        ("dir_path", REQUIRED),
        ("adata", None),
        ("accelerator", "auto"),
        ("device", "auto"),
        ("prefix", None),
        ("backup_url", None),
        ("datamodule", None),
        ("allowed_classes_names_list", None),
    ],
    "load_query_data": [
        ("adata", None),
        ("reference_model", None),
        ("registry", None),
        ("inplace_subset_query_vars", False),
        ("accelerator", "auto"),
        ("device", "auto"),
        ("unfrozen", False),
        ("freeze_dropout", False),
        ("freeze_expression", True),
        ("freeze_decoder_first_layer", True),
        ("freeze_batchnorm_encoder", True),
        ("freeze_batchnorm_decoder", False),
        ("freeze_classifier", True),
        ("transfer_batch", True),
        ("datamodule", None),
    ],
    "prepare_query_anndata": [
        ("adata", REQUIRED),
        ("reference_model", REQUIRED),
        ("return_reference_var_names", False),
        ("inplace", True),
    ],
    "view_anndata_setup": [("adata", None), ("hide_state_registries", False)],
    "to_device": [("device", REQUIRED)],
}


def our_parameters(name: str) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(getattr(SCVI, name)).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", sorted(SCVI_TOOLS_1_5_1))
def test_every_scvi_tools_parameter_is_accepted_in_place_with_its_default(name):
    ours = {p.name: p for p in our_parameters(name)}
    positional = [p.name for p in our_parameters(name) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    theirs = SCVI_TOOLS_1_5_1[name]
    missing = [parameter for parameter, _ in theirs if parameter not in ours]
    assert not missing, f"SCVI.{name} lacks scvi-tools' parameters {missing}"
    assert positional[: len(theirs)] == [parameter for parameter, _ in theirs], (
        f"SCVI.{name}: positional order {positional} differs from scvi-tools' {[p for p, _ in theirs]}"
    )
    for parameter, default in theirs:
        if default is not REQUIRED:
            assert ours[parameter].default == default, f"SCVI.{name}({parameter}=...) default differs"


def test_keyword_arguments_scvi_tools_passes_through_kwargs_are_accepted(tmp_path):
    """Names scvi-tools documents for **kwargs (trainer, data loader, plan, importance weighting, Bayes factors)
    reach their use or are explained by a warning, never a TypeError; a misspelt one is a TypeError."""
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    adata = anndata.AnnData(sp.csr_matrix(rng.poisson(2.0, (120, 30)).astype(np.float32)))
    adata.obs["batch"] = ["a", "b"] * 60
    adata.obs["group"] = ["x"] * 60 + ["y"] * 60
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=3, n_hidden=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.train(
            max_epochs=2,
            check_val_every_n_epoch=1,
            early_stopping_patience=5,
            early_stopping_min_delta=0.0,
            early_stopping_monitor="elbo_validation",
            early_stopping_warmup_epochs=0,
            enable_progress_bar=False,
            gradient_clip_val=1.0,
            log_every_n_steps=5,
            logger=False,
            enable_checkpointing=False,
            precision=32,
            datasplitter_kwargs={"num_workers": 0, "drop_last": False},
            plan_kwargs={
                "lr": 2e-3,
                "weight_decay": 0.0,
                "eps": 1e-2,
                "n_steps_kl_warmup": 10,
                "n_epochs_kl_warmup": None,
                "optimizer": "AdamW",
                "reduce_lr_on_plateau": True,
                "lr_factor": 0.5,
                "lr_patience": 3,
                "lr_threshold": 0.0,
                "lr_min": 0.0,
                "max_kl_weight": 1.0,
                "min_kl_weight": 0.0,
                "compile": False,
            },
            devices=1,
            load_sparse_tensor=True,
        )
        model.get_latent_representation(num_workers=0, pin_memory=False)
        model.get_normalized_expression(
            indices=np.arange(60),
            n_samples_overall=50,
            weights="importance",
            max_cells=20,
            truncation=True,
            n_mc_samples=10,
            n_mc_samples_per_pass=5,
        )
        model.get_marginal_ll(n_mc_samples=4, n_mc_samples_per_pass=2)
        model.differential_expression(
            groupby="group",
            n_samples_overall=200,
            pseudocounts=1e-4,
            use_permutation=True,
            m_permutation=100,
            test_mode="two",
        )
    with pytest.raises(TypeError, match="plan_kwargs"):
        model.train(max_epochs=1, plan_kwargs={"learning_rate": 1e-3})
    with pytest.raises(TypeError, match="gvie_mean"):
        model.get_latent_representation(gvie_mean=False)
