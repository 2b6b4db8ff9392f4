"""`SCVI`: scvi-tools' `SCVI` over AnnDatas and Zarr stores, with its method names, arguments and defaults.

    >>> from scvi_scale import SCVI
    >>> SCVI.setup_anndata(adata, batch_key="batch")           # in place, as scvi-tools; or SCVI.setup_zarr(path)
    >>> model = SCVI(adata, n_latent=10)                        # or SCVI("atlas.zarr", ...)
    >>> model.train(max_epochs=20, early_stopping=True)
    >>> adata.obsm["X_scVI"] = model.get_latent_representation()
    >>> model.save("model_dir/", save_anndata=True); model = SCVI.load("model_dir/", adata)

A thin face: each method checks scvi-tools' arguments and hands them over. An output method makes one OutputPlan
(what to compute, where it goes, how to shape it) for plans.execute, which does the walk they all share. Behind it:
training.py (training's set-up), query.py (query mapping), analyses.py (outputs of several passes), saving.py,
sources.py (where the cells come from: a Zarr store streamed in row blocks, or an AnnData read in place) and
compat.py (scvi-tools arguments without a use here, explained with a warning).

Parameters the output methods share ("Shared" in their docstrings):
    adata       an AnnData or a store with the model's genes (None: the model's own data)
    indices     cell positions or a boolean mask (None: all cells); results come in their order
    batch_size  cells per forward pass (None: the default)
    dataloader  scvi-tools' own data loader: refused (it would change what is computed)
    write_to    a key to write the output to: into the store, chunk by chunk and resumable, or into the AnnData's
                obsm / layers; None returns it, as scvi-tools
    **kwargs    scvi-tools' data-loader arguments (accepted and ignored with a warning; any other unknown name is
                a TypeError) and our output options (outputs.runner.OutputRequest):
        output_store  where store outputs go: None for the input store, or the path of a separate AnnData store
        overwrite     replace an existing output of that key (otherwise refused)
        client        a dask.distributed Client: chunks fan out over its workers (each loads the model once)
        model_dir     where the workers load the model from (default: the model is saved to a temporary folder)
        seed          seeds every random draw, keyed by cell (outputs/jobs.py): same seed, same values
        chunk_rows    cells per chunk and per written row chunk (default: the store's chunk_rows)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import numpy as np
import pandas as pd
import torch

from scvi_scale import persist
from scvi_scale.data import CountStore, Registry
from scvi_scale.data.aligned import AlignedStore
from scvi_scale.data.anndata_source import AnnDataSource
from scvi_scale.model import analyses, compat, output_plans, query, saving, sources, training
from scvi_scale.model.plans import OutputCall, execute, per_cell
from scvi_scale.module import VAE, to_tensors
from scvi_scale.outputs import differential
from scvi_scale.outputs.importance import ImportanceOptions
from scvi_scale.outputs.runner import ModelInputs
from scvi_scale.settings import settings

MINIFIED_TYPE = "latent_posterior_parameters"
CHECKED_CELLS = 1 << 20  # cells whose obs codes are range-checked at once (int64 while checked: 8 MB a field)
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
        compat.explain_ignored(
            "SCVI",
            ignored,
            "size factors are read from the registry (size_factor_key) and our "
            "decoder keeps its softmax; autotune payloads are not produced",
        )
        self.registry = registry
        self.store = sources.source_for_model(adata, registry)
        self.init_params = dict(
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
        if not use_observed_lib_size:
            flat = [c for c, v in zip(registry.batch_categories, registry.library_log_vars, strict=True) if not v > 0]
            if flat:
                raise ValueError(
                    f"use_observed_lib_size=False puts a log-normal prior on each batch's library sizes, but batches "
                    f"{flat} of {registry.batch_key!r} have log library sizes of variance 0 (one cell, or equal "
                    "library sizes): keep the observed library (the default), or merge those batches"
                )
        with torch.random.fork_rng(devices=[]):  # the initial weights come from settings.seed, reproducibly
            torch.manual_seed(settings.seed)
            self.module = VAE.from_registry(registry, **self.init_params)
        self.is_trained = False
        self.history_: dict[str, list[tuple[int, float]]] = {}
        self.train_indices = self.validation_indices = None
        self.run_info: dict = {}  # measurements of the last training run (report)
        self.minified_data_type: str | None = None
        self._minified_keys: tuple[str, str] | None = None
        self._obs_arrays = None

    @property
    def var_names(self) -> pd.Index:
        return pd.Index(self.registry.var_names)

    @property
    def adata(self):
        """The AnnData the model was built over (None for a model over a Zarr store: see `store`)."""
        return self.store.adata if isinstance(self.store, AnnDataSource) else None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # --- set-up and data -----------------------------------------------------------------------------------------

    @classmethod
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
        layer
            The layer of raw counts (None: X).
        batch_key, labels_key, size_factor_key, categorical_covariate_keys, continuous_covariate_keys
            The obs columns registered (None: none).
        **kwargs
            scvi-tools' other fields: ignored with a warning.
        """
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
        layer, batch_key, labels_key, size_factor_key, categorical_covariate_keys, continuous_covariate_keys
            As setup_anndata's.
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

    def view_anndata_setup(self, adata=None, hide_state_registries: bool = False) -> None:
        """Print the set-up of the data: its registered fields and their categories.

        Parameters
        ----------
        adata
            The data (None: the model's own).
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
        encoded = self.registry.encode(source)
        for first in range(0, source.n_obs, CHECKED_CELLS):  # in parts: the check widens the codes to int64
            self.module.check_inputs(to_tensors(encoded, "cpu", slice(first, first + CHECKED_CELLS)))
        if self.minified_data_type is not None:
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

    # --- training ------------------------------------------------------------------------------------------------

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_config: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        trainer_config: dict | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        seed: int | None = None,
        block_rows: int | None = None,
        buffer_blocks: int | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train with scvi-tools' defaults (Adam lr 1e-3, eps 0.01, weight decay 1e-6, KL warm-up over 400 epochs,
        90/10 split; no validation unless early stopping, LR on plateau or check_val_every_n_epoch asks). Under
        torch.distributed (torchrun, `distributed.launch`) every rank trains on its share; rank 0 checkpoints (save
        with `distributed.on_rank_zero`).

        Parameters
        ----------
        max_epochs
            Default scvi-tools' heuristic, min(400, round(20,000 / n_cells * 400)).
        accelerator, devices
            "auto", "cpu", "gpu" or "cuda"; one process trains on one device (more: torchrun; else warned).
        train_size, validation_size, shuffle_set_split, batch_size, early_stopping
            scvi-tools' split (default 0.9 and the rest), cells per step and rank, stopping on the monitor.
        load_sparse_tensor, datamodule, datasplitter_kwargs
            Ignored with a warning (CSR is read anyway); refused; drop_last (data-loader options warned).
        plan_config, plan_kwargs
            TrainingPlan options: lr, weight_decay, eps, optimizer ("Adam", "AdamW"), n_epochs_kl_warmup,
            n_steps_kl_warmup, max_kl_weight, min_kl_weight, reduce_lr_on_plateau, lr_factor, lr_patience,
            lr_threshold, lr_min, lr_scheduler_metric.
        trainer_config, **trainer_kwargs
            check_val_every_n_epoch, early_stopping_{monitor,patience,min_delta,warmup_epochs}, enable_progress_bar,
            gradient_clip_val, max_steps, checkpoint_every_{n_steps,seconds}; Lightning's others are warned.
        checkpoint_dir, resume
            Checkpoint written atomically each epoch; resume=True continues a killed run to where it would have got.
        seed, block_rows, buffer_blocks
            Seeds split, sampler and torch (default settings.seed, which drew the initial weights: the same seed,
            machine and thread count give the same model); the sampler's shuffle block and buffer sizes.
        """
        compat.refuse("train", datamodule=datamodule)
        if self.minified_data_type is not None:
            raise ValueError("a minified model holds no counts to train on; train the full model")
        if devices not in ("auto", 1, [0], "1"):
            compat.explain_ignored(
                "train",
                ["devices"],
                "one process trains on one device; for several, run under torchrun or `scvi-scale train --nproc N`",
            )
        if load_sparse_tensor:
            compat.explain_ignored("train", ["load_sparse_tensor"], "sparse counts are always read as CSR")
        training.train_model(
            self,
            training.TrainingSetup.of_call(
                self.store.n_obs,
                max_epochs=max_epochs,
                early_stopping=early_stopping,
                plan={**(plan_config or {}), **(plan_kwargs or {})},
                trainer={**(trainer_config or {}), **trainer_kwargs},
                splitter=datasplitter_kwargs,
                train_size=train_size,
                checkpoint_dir=checkpoint_dir,
                seed=seed,
                validation_size=validation_size,
                shuffle=shuffle_set_split,
                batch_size=batch_size,
                resume=resume,
                block_rows=block_rows,
                buffer_blocks=buffer_blocks,
                accelerator=accelerator,
            ),
        )

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics as scvi-tools shows them: metric name -> DataFrame indexed by epoch."""
        return persist.history_frames(self.history_)

    # --- evaluation: minibatch by minibatch, over the counts -------------------------------------------------------

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
        adata, indices, batch_size, dataloader
            Shared.
        return_mean
            Return the mean over cells.
        data_loader_kwargs, **kwargs
            scvi-tools' data-loader arguments: ignored with a warning.

        Returns
        -------
        float or np.ndarray
            The mean, or the ELBO per cell (n_cells,).
        """

        def elbo_per_cell(tensors):
            losses = self.module.loss(tensors)
            return -(losses["reconstruction_loss"] + losses["kl_local"])

        elbo = per_cell(
            self,
            OutputCall(
                "get_elbo",
                adata,
                indices,
                batch_size,
                options={**(data_loader_kwargs or {}), **kwargs},
                dataloader=dataloader,
            ),
            elbo_per_cell,
        )
        return float(elbo.mean()) if return_mean else elbo

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
        adata, indices, batch_size, dataloader, return_mean, data_loader_kwargs, **kwargs
            As get_elbo's.

        Returns
        -------
        dict
            {"reconstruction_loss": the mean over cells, or per cell (n_cells,)}.
        """
        loss = per_cell(
            self,
            OutputCall(
                "get_reconstruction_error",
                adata,
                indices,
                batch_size,
                options={**(data_loader_kwargs or {}), **kwargs},
                dataloader=dataloader,
            ),
            lambda tensors: self.module.loss(tensors)["reconstruction_loss"],
        )
        return {"reconstruction_loss": float(loss.mean()) if return_mean else loss}

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
        n_mc_samples
            Importance samples per cell (n_mc_samples_per_pass in kwargs: how many are decoded at once).
        adata, indices, batch_size, return_mean, dataloader, data_loader_kwargs, **kwargs
            As get_elbo's.

        Returns
        -------
        float or np.ndarray
            The mean over cells, or per cell (n_cells,).
        """
        per_pass = int(kwargs.pop("n_mc_samples_per_pass", 1))
        ll = per_cell(
            self,
            OutputCall(
                "get_marginal_ll",
                adata,
                indices,
                batch_size,
                options={**(data_loader_kwargs or {}), **kwargs},
                dataloader=dataloader,
            ),
            lambda tensors: self.module.marginal_ll(tensors, n_mc_samples=n_mc_samples, n_mc_samples_per_pass=per_pass),
        )
        return float(ll.mean()) if return_mean else ll

    # --- latent space --------------------------------------------------------------------------------------------

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
        adata, indices, batch_size, dataloader, write_to, **kwargs
            Shared; write_to: obsm/<key> (and with return_dist the variance, obsm/<key>_var).
        give_mean, mc_samples
            The mean (for latent_distribution "ln", from mc_samples draws); False: one draw per cell.
        return_dist
            Return the mean and the variance of q(z | x).

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
        adata, indices, batch_size, dataloader, write_to, **kwargs
            Shared; write_to: obsm/<key>.
        give_mean
            The mean of q(l | x) (a model with a latent library); False: exp of the observed or sampled log library.

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

    def get_aggregated_posterior(
        self, adata=None, indices=None, batch_size: int | None = None, dof: float | None = 3.0
    ) -> torch.distributions.Distribution:
        """The cells' aggregated posterior, as scvi-tools: an equal-weight mixture of their q(z | x).

        Parameters
        ----------
        adata, indices, batch_size
            Shared.
        dof
            The Student's t components' degrees of freedom (None: Normal components).

        Returns
        -------
        torch.distributions.Distribution
            A MixtureSameFamily over n_latent dimensions.
        """
        loc, variance = self.get_latent_representation(adata, indices, batch_size=batch_size, return_dist=True)
        return analyses.aggregated_posterior(loc, variance, dof, self.device)

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
        num_cells_posterior, seed
            A sample's posterior is of at most this many of its cells, picked with `seed`.
        batch_size, dof, dataloader
            As get_aggregated_posterior's; dataloader is refused.

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

    # --- expression ----------------------------------------------------------------------------------------------

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
        adata, indices, batch_size, dataloader, write_to, **kwargs
            Shared; write_to: layers/<key> (n_obs, n_vars), or with gene_list obsm/<key> (names in its attributes).
        transform_batch
            None (each cell's own batch), a category, or a list of them (averaged, one draw per batch).
        gene_list
            The genes (None: all).
        library_size, n_samples, return_mean
            The library px_scale is scaled to ("latent": each cell's); posterior draws per cell, their mean or each.
        n_samples_overall, weights
            (n_samples_overall, n_genes) draws over the cells instead, picked uniformly or by importance weight
            (max_cells, truncation, n_mc_samples, n_mc_samples_per_pass in kwargs).
        return_numpy, silent, data_loader_kwargs
            An array, not a DataFrame; no progress bar; data-loader arguments (ignored, warned).
        dtype
            Of written and returned values ("float16": half the bytes, 3 significant digits).

        Returns
        -------
        pd.DataFrame or np.ndarray
            See above; a lazy array when written to a store.
        """
        importance = ImportanceOptions(**{key: kwargs.pop(key) for key in IMPORTANCE_KEYS if key in kwargs})
        call = OutputCall(
            "get_normalized_expression",
            adata,
            indices,
            batch_size,
            silent,
            {**(data_loader_kwargs or {}), **kwargs},
            dataloader,
        )
        return execute(
            self,
            call,
            output_plans.normalized_expression(
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
            ),
        )

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
        adata, indices, batch_size, dataloader, write_to, **kwargs
            Shared; write_to: layers/<key>_mean, <key>_dispersions, <key>_dropout.
        n_samples, give_mean
            Posterior draws per cell, and their mean or each.

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
        adata, indices, batch_size, dataloader, write_to, **kwargs
            Shared; write_to: layers/<key> (or <key>_0 ... for n_samples > 1), CSR.
        transform_batch, gene_list, silent
            As get_normalized_expression's (gene_list: not when written).
        n_samples
            Draws per cell.

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
        adata, indices, batch_size
            Shared.
        n_samples, rna_size_factor
            Draws per cell, and the library they are scaled to.
        transform_batch
            As get_normalized_expression's: one correlation per batch, averaged.
        correlation_type, silent, seed
            Spearman's or Pearson's; no progress bar; the draws' seed.

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
        adata, batch_size, dataloader, **kwargs
            Shared; kwargs also take get_bayes_factors' options (n_samples_overall, use_permutation, m_permutation,
            pseudocounts, test_mode), threshold_counts and max_sample_bytes.
        groupby, group1, group2, idx1, idx2
            obs[groupby] (also a column added after set-up) values group1 against group2 (or the rest), or cells.
        mode, delta, all_stats, batch_correction, batchid1, batchid2, fdr_target, silent, weights,
        filter_outlier_cells, importance_weighting_kwargs
            scvi-tools' (see outputs/differential.py: the cells are gathered in bounded memory).
        write_to, table_path
            Also write the table as uns/<key> of the store (or AnnData), and as a .csv (or .parquet: pyarrow) file
            of exactly that path; refused before the work when it exists, unless overwrite.

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
        return execute(
            self, call, output_plans.differential_expression(self, comparison, options, write_to, table_path)
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

    # --- persistence ---------------------------------------------------------------------------------------------

    def save(
        self,
        dir_path,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        legacy_mudata_format: bool = False,
        datamodule=None,
        format: Literal["scvi-scale", "scvi-tools"] = "scvi-scale",
        **anndata_write_kwargs,
    ) -> None:
        """Write dir_path/{prefix}model.pt: weights, init parameters, registry, var names, history and the store's path
        (so load can reopen it).

        Parameters
        ----------
        dir_path, prefix, overwrite
            The folder (or an s3:// or gs:// URL), a prefix of its file names, and whether to replace a model there.
        save_anndata, **anndata_write_kwargs
            Write the AnnData beside it ({prefix}adata.h5ad, as scvi-tools); a store's counts stay where they are.
        save_kwargs, legacy_mudata_format, datamodule
            Ignored with a warning (torch.save; no MuData); a datamodule is refused.
        format
            "scvi-tools" writes what scvi-tools' SCVI.load reads.
        """
        compat.refuse("save", datamodule=datamodule)
        compat.explain_ignored(
            "save",
            [k for k, v in (("save_kwargs", save_kwargs), ("legacy_mudata_format", legacy_mudata_format)) if v],
            "model.pt is written with torch.save; there is no MuData here",
        )
        with persist.model_folder(dir_path, prefix, overwrite) as folder:  # a URL: staged, model.pt uploaded last
            if save_anndata and isinstance(self.store, AnnDataSource):  # before model.pt, which completes the folder
                folder.mkdir(parents=True, exist_ok=True)
                self.store.adata.write_h5ad(persist.anndata_path(folder, prefix), **anndata_write_kwargs)
            persist.write_model(
                folder, saving.saved_form(self), module=self.module, overwrite=overwrite, format=format, prefix=prefix
            )
        if save_anndata and not isinstance(self.store, AnnDataSource):
            compat.explain_ignored(
                "save",
                ["save_anndata"],
                f"the counts stay in the store {self.store.path}, whose path the model directory records",
            )

    @classmethod
    def load(
        cls,
        dir_path,
        adata=None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
        datamodule=None,
        allowed_classes_names_list: list[str] | None = None,
    ) -> SCVI:
        """A model that `save` (or scvi-tools' SCVI.save) wrote.

        Parameters
        ----------
        dir_path, prefix
            The model's folder (or its s3://, gs:// or https:// URL) and file-name prefix.
        adata
            An AnnData (checked against the saved set-up, and set up in place), a store path or CountStore; None: the
            AnnData saved beside the model, or the store it was saved from.
        accelerator, device
            Where the module goes ("auto", "cpu", "gpu", "cuda"; "auto" or a device index).
        backup_url, allowed_classes_names_list, datamodule
            Ignored with a warning (files are read from dir_path only); a datamodule is refused.

        Returns
        -------
        SCVI
        """
        compat.refuse("load", datamodule=datamodule)
        compat.explain_ignored(
            "load",
            [
                k
                for k, v in (("backup_url", backup_url), ("allowed_classes_names_list", allowed_classes_names_list))
                if v is not None
            ],
            "files are read from dir_path only",
        )
        saved = persist.read_model(dir_path, prefix=prefix)
        if adata is None:
            adata = persist.saved_data(dir_path, prefix, saved)
        return saving.from_saved(cls, saved, adata, training.resolve_device(accelerator, device))

    # --- query mapping (scArches): query.py ----------------------------------------------------------------------

    @staticmethod
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
        var_names = pd.Index(query.reference(reference_model).var_names)
        if return_reference_var_names:
            return var_names
        return query.pad_and_sort(adata, var_names, inplace)

    @classmethod
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
        return query.aligned_store(query_path, reference, layer)

    @classmethod
    def load_query_data(
        cls,
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
    ) -> SCVI:
        """A model over the query with the reference's weights, its batch encoding extended, ready to train.

        Parameters
        ----------
        adata
            An AnnData with the reference's genes (prepare_query_anndata), or a store (aligned on the fly), with
            the reference's batch column (labels only for dispersion "gene-label").
        reference_model
            A model or a directory written by SCVI.save (ours or scvi-tools').
        inplace_subset_query_vars, accelerator, device
            Subset an AnnData with extra genes to the reference's, in place; where the module goes, as load's.
        unfrozen, freeze_dropout, freeze_expression, freeze_decoder_first_layer, freeze_batchnorm_encoder,
        freeze_batchnorm_decoder
            scvi-tools' freezing (surgery.py); unfrozen=True trains everything.
        freeze_classifier, transfer_batch, registry, datamodule
            SCANVI's and SYSVI's (no use for SCVI); registry and datamodule are refused.

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
        return query.query_model(
            cls,
            adata,
            reference_model,
            inplace_subset_query_vars=inplace_subset_query_vars,
            device=training.resolve_device(accelerator, device),
            freeze=freeze,
        )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}: {v!r}" for k, v in self.init_params.items())
        status = "trained" if self.is_trained else "not trained"
        return f"SCVI model with the following parameters:\n{params}\nData: {self.store!r}\nTraining status: {status}"
