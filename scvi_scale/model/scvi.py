"""`SCVI`: scvi-tools' `SCVI` over AnnDatas and Zarr stores, with its method names, arguments and defaults.

    >>> from scvi_scale import SCVI
    >>> SCVI.setup_anndata(adata, batch_key="batch")           # in place, as scvi-tools; or SCVI.setup_zarr(path)
    >>> model = SCVI(adata, n_latent=10)                        # or SCVI("atlas.zarr", ...)
    >>> model.train(max_epochs=20, early_stopping=True)
    >>> adata.obsm["X_scVI"] = model.get_latent_representation()
    >>> model.save("model_dir/", save_anndata=True); model = SCVI.load("model_dir/", adata)

A thin face: each method checks scvi-tools' arguments and hands them over. An output method makes one OutputPlan
(what to compute, where it goes, how to shape it) for plans.execute, which does the walk they all share. The methods
are written by area, as functions of the model (`self`), and bound in SCVI's class body here, so that the class lists
them all: here the model's construction, set-up and data, the report and minifying; train in training.py; the latent
space and the ELBO and the like in latent.py; the gene-space outputs (expression, likelihood, predictive samples,
correlation, differential expression) in expression.py; save and load in saving.py; query mapping in query.py. The
parameters they share are described once, in docs.py. Behind them: analyses.py (outputs of several passes),
sources.py (where the cells come from: a Zarr store streamed in row blocks, or an AnnData read in place) and compat.py
(scvi-tools arguments without a use here, explained with a warning).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch

from scvi_scale import kernels
from scvi_scale.data import CountStore, Registry
from scvi_scale.data.anndata_source import AnnDataSource
from scvi_scale.model import analyses, compat, docs, expression, latent, output_plans, query, saving, sources, training
from scvi_scale.model.plans import OutputCall, execute
from scvi_scale.module import VAE
from scvi_scale.outputs.runner import ModelInputs
from scvi_scale.settings import settings

MINIFIED_TYPE: Literal["latent_posterior_parameters"] = "latent_posterior_parameters"
IGNORED_INIT = (
    "size factors are read from the registry (size_factor_key) and our decoder keeps its softmax; autotune payloads "
    "are not produced"
)


class SCVI:
    """scVI (Lopez et al. 2018) over an AnnData set up with `setup_anndata` or a store set up with `setup_zarr`.

    Parameters
    ----------
    adata
        An AnnData set up with setup_anndata, or a store path (or list of paths) set up with setup_zarr.
    registry
        The data's set-up (default: the one setup_anndata / setup_zarr made).
    n_hidden, n_latent, n_layers, dropout_rate
        Nodes per hidden layer, dimension of z, hidden layers of encoder and decoder, dropout rate.
    dispersion
        The NB dispersion: per gene, per gene and batch, per gene and label, or per cell.
    gene_likelihood, latent_distribution
        The counts' likelihood; z's distribution (normal, or "ln": logistic normal).
    use_observed_lib_size
        Use the observed library size (False: a latent one, with a log-normal prior per batch).
    **kwargs
        To the module (`VAE`): log_variational, encode_covariates, deeply_inject_covariates, batch_representation,
        batch_embedding_kwargs, use_batch_norm, use_layer_norm, var_activation, extra_{encoder,decoder}_kwargs.
    """

    def __init__(
        self,
        adata=None,
        registry: Registry | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson", "normal"] = "zinb",
        use_observed_lib_size: bool = True,
        latent_distribution: Literal["normal", "ln"] = "normal",
        **kwargs,
    ):
        if adata is None:
            raise ValueError(
                "SCVI needs its data: an AnnData set up with SCVI.setup_anndata, or a store path set "
                "up with SCVI.setup_zarr (a datamodule-only model is not supported)"
            )
        if not isinstance(registry, Registry):  # None, or scvi-tools' registry dict (for data-less models)
            registry = sources.setup_of(adata)
        ignored = [key for key in ("extra_payload_autotune", "use_size_factor_key") if key in kwargs]
        compat.explain_ignored("SCVI", ignored, IGNORED_INIT)
        if not use_observed_lib_size:
            sources.check_library_prior(registry)
        store = sources.source_for_model(adata, registry)
        init_params = dict(
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            use_observed_lib_size=use_observed_lib_size,
            latent_distribution=latent_distribution,
            **{k: v for k, v in kwargs.items() if k not in ignored},
        )
        with torch.random.fork_rng(devices=[]):  # the initial weights come from settings.seed, reproducibly
            torch.manual_seed(settings.seed)
            module = VAE.from_registry(registry, **init_params)
        self._hold(registry, store, init_params, module)

    def _hold(self, registry: Registry, store: CountStore, init_params: dict, module: VAE) -> None:
        """Become an untrained model of `module` (built with init_params) over `store`, set up by `registry`: the
        end of __init__, and all of it for a saved model (saving.from_saved), whose module and store are ready."""
        kernels.build_native_in_background()
        self.registry, self.store, self.init_params, self.module = registry, store, init_params, module
        self.is_trained = False
        self.history_: dict[str, list[tuple[int, float]]] = {}
        self.train_indices = self.validation_indices = None
        self.run_info: dict = {}  # measurements of the last training run (report)
        self.minified_data_type: str | None = None
        self._minified_keys: tuple[str, str] | None = None
        self._obs_arrays: dict[str, np.ndarray] | None = None

    @property
    def var_names(self) -> pd.Index:
        return pd.Index(self.registry.var_names)

    @property
    def adata(self):
        """The AnnData the model was built over (None for a model over a Zarr store: see `store`)."""
        return self.store.adata if isinstance(self.store, AnnDataSource) else None

    # --- set-up and data -----------------------------------------------------------------------------------------

    @classmethod
    @docs.fill
    def setup_anndata(
        cls,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> None:
        """scvi-tools' setup_anndata, in place: one pass over the counts checks them and computes the per-batch
        library statistics, a uuid goes into adata.uns["_scvi_uuid"], nothing else is changed or copied.

        Parameters
        ----------
        adata
            The AnnData (in memory or backed). Columns added to its obs later are seen by the outputs.
        {layer}
        {obs_keys}
        **kwargs
            scvi-tools' other fields: ignored with a warning.
        """
        kernels.build_native_in_background()
        compat.explain_ignored("setup_anndata", kwargs, "no other fields are registered for SCVI")
        sources.remember_anndata_setup(
            adata,
            Registry.build(
                AnnDataSource(adata, layer=layer),
                batch_key=batch_key,
                labels_key=labels_key,
                size_factor_key=size_factor_key,
                categorical_covariate_keys=categorical_covariate_keys,
                continuous_covariate_keys=continuous_covariate_keys,
            ),
        )

    @classmethod
    @docs.fill
    def setup_zarr(
        cls,
        path,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        *,
        join: Literal["inner", "outer"] = "inner",
        store_key: str | None = None,
        storage_options: dict | None = None,
    ) -> Registry:
        """setup_anndata for a store, without loading X: one streaming pass validates the counts (finite,
        non-negative integers; the error names the rows) and computes the library prior's statistics. Only reads.

        Parameters
        ----------
        path
            A store, or a list of stores read as one without concatenating them (blocks are drawn across all,
            written outputs go back into the store their cells came from).
        {layer}
        {obs_keys}
        join, store_key
            How a list joins its genes (as anndata.concat); an obs column to hold each cell's store.
        storage_options
            For a store at a URL (s3://, gs://, https://): fsspec's options (credentials, endpoint_url, ...), kept
            in memory for it so that SCVI(path) and the outputs reach it too; never saved (data.remote).

        Returns
        -------
        Registry
            The set-up (also kept for `SCVI(path)`).
        """
        kernels.build_native_in_background()  # gcc on the other core while the store is opened and checked
        return sources.setup_store(
            path,
            layer,
            join,
            store_key,
            storage_options,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )

    @docs.fill
    def view_anndata_setup(self, adata=None, hide_state_registries: bool = False) -> None:
        """Print the set-up of the data: its registered fields and their categories.

        Parameters
        ----------
        {adata}
        hide_state_registries
            Leave out the categories.
        """
        print(sources.describe_setup(self._source(adata), self.registry, hide_state_registries))

    def to_device(self, device: str | int | torch.device) -> None:
        """Move the module to `device`.

        Parameters
        ----------
        device
            "cpu", "cuda", "cuda:1", or a CUDA device index.
        """
        self.module.to(torch.device(f"cuda:{device}" if isinstance(device, int) else device))

    def _source(self, adata) -> CountStore:
        """The reader of `adata` (None: the model's own), checked to hold the model's genes in order."""
        return self.store if adata is None else sources.source_for_model(adata, self.registry)

    def _encoded(self, source: CountStore) -> dict[str, np.ndarray]:
        """Per-cell encoded obs fields of `source`, checked once (the data boundary: the module's per-step path
        reads no values back). A store's are kept; an AnnData's obs is live and re-read at each call."""
        if source is self.store and self._obs_arrays is not None and not isinstance(source, AnnDataSource):
            return self._obs_arrays
        encoded = sources.checked_obs_arrays(source, self.registry, self.module)
        if self._minified_keys is not None:  # set with minified_data_type
            encoded.update(analyses.cached_posterior(source, *self._minified_keys))
        if source is self.store:
            self._obs_arrays = encoded
        return encoded

    @property
    def obs_arrays(self) -> dict[str, np.ndarray]:
        """Per-cell encoded obs fields (batch, labels, covariates) of the model's own data."""
        return self._encoded(self.store)

    def _inputs(self, adata=None) -> ModelInputs:
        source = self._source(adata)
        return ModelInputs(
            self.module,
            source,
            self._encoded(source),
            minified=self.minified_data_type is not None,
            save=lambda folder: self.save(folder, overwrite=True),
        )

    # --- report and minified models ------------------------------------------------------------------------------

    def report(
        self,
        out_dir,
        adata=None,
        labels_key: str | None = None,
        max_cells: int = 200_000,
        seed: int | None = None,
        overwrite: bool = False,
    ) -> dict:
        """The integration report (extra `scvi-scale[report]`): training history, run measurements, a UMAP and scIB
        metrics of the latent against an uncorrected PCA baseline on a seeded subsample, and the outputs in the store.

        Parameters
        ----------
        out_dir
            Gets report.html (self-contained), its PNGs and report.json.
        adata, labels_key
            The data (None: the model's); the obs column of labels (default the registered one; None: label-free).
        max_cells, seed
            The subsample's size bound (so it stays bounded on an atlas) and seed (default settings.seed).
        overwrite
            Replace a report in out_dir (else FileExistsError, before the work).

        Returns
        -------
        dict
            report.json's content.
        """
        return analyses.report(
            self, out_dir, adata, labels_key, max_cells, settings.seed if seed is None else seed, overwrite
        )

    def minify_adata(
        self,
        minified_data_type: Literal["latent_posterior_parameters"] = MINIFIED_TYPE,
        use_latent_qzm_key: str = "X_latent_qzm",
        use_latent_qzv_key: str = "X_latent_qzv",
    ) -> None:
        """scvi-tools' minified model: q(z | x) and the observed library size of every cell are kept, and the outputs
        read them, not the counts. Nothing else of the data changes (a store keeps X); training, get_elbo and the like
        are then refused.

        Parameters
        ----------
        minified_data_type
            What is kept (scvi-tools' one kind).
        use_latent_qzm_key, use_latent_qzv_key
            The obsm keys of q(z | x)'s mean and variance (the library goes to obs["observed_lib_size"]).
        """
        if minified_data_type != MINIFIED_TYPE:
            raise NotImplementedError(f"minified_data_type={minified_data_type!r}: only {MINIFIED_TYPE!r}")
        if not self.module.use_observed_lib_size:
            raise NotImplementedError(
                "minifying needs an observed library (use_observed_lib_size=True), as in scvi-tools"
            )
        execute(
            self,
            OutputCall("minify_adata", options={"overwrite": True}),
            output_plans.minified(self, use_latent_qzm_key, use_latent_qzv_key),
        )
        analyses.write_observed_library(self.store, minified_data_type)
        self.minified_data_type = minified_data_type
        self._minified_keys = (use_latent_qzm_key, use_latent_qzv_key)
        self._obs_arrays = None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}: {v!r}" for k, v in self.init_params.items())
        status = "trained" if self.is_trained else "not trained"
        return f"SCVI model with the following parameters:\n{params}\nData: {self.store!r}\nTraining status: {status}"

    # --- training (training.py) ----------------------------------------------------------------------------------

    train = training.train
    history = property(training.history)

    # --- the latent space and the evaluation of the fit (latent.py) ----------------------------------------------

    device = property(latent.device)
    get_elbo = latent.get_elbo
    get_reconstruction_error = latent.get_reconstruction_error
    get_marginal_ll = latent.get_marginal_ll
    get_latent_representation = latent.get_latent_representation
    write_latent_representation = latent.write_latent_representation
    get_aggregated_posterior = latent.get_aggregated_posterior
    differential_abundance = latent.differential_abundance

    # --- outputs in gene space (expression.py) -------------------------------------------------------------------

    get_latent_library_size = expression.get_latent_library_size
    get_normalized_expression = expression.get_normalized_expression
    get_likelihood_parameters = expression.get_likelihood_parameters
    posterior_predictive_sample = expression.posterior_predictive_sample
    get_feature_correlation_matrix = expression.get_feature_correlation_matrix
    differential_expression = expression.differential_expression

    # --- save and load (saving.py) -------------------------------------------------------------------------------

    save = saving.save
    load: classmethod[SCVI, ..., SCVI] = classmethod(saving.load)  # mypy infers no classmethod(generic function)

    # --- query mapping (query.py) --------------------------------------------------------------------------------

    prepare_query_anndata = staticmethod(query.prepare_query_anndata)
    prepare_query_zarr = classmethod(query.prepare_query_zarr)
    load_query_data: classmethod[SCVI, ..., SCVI] = classmethod(query.load_query_data)  # as load
