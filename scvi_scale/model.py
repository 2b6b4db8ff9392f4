"""`SCVI`: the user-facing model over AnnData-Zarr stores, with scvi-tools' method names, arguments and defaults.

    >>> from scvi_scale import SCVI
    >>> SCVI.setup_zarr("atlas.zarr", batch_key="batch")
    >>> model = SCVI("atlas.zarr", n_latent=10)
    >>> model.train(max_epochs=20, checkpoint_dir="run/")     # streams the store; resume=True after a kill
    >>> latent = model.get_latent_representation()            # (n_obs, n_latent), computed in chunks
    >>> model.save("model_dir/"); model = SCVI.load("model_dir/", "atlas.zarr")

This is the one place that ties the store (`data`), the sampler, the torch module, the training loop (`train`),
the outputs (`outputs`) and model directories (`persist`) together. Every method is short: it turns scvi-tools'
arguments into what the layer below takes and hands over; everything below works on row blocks, so memory is
bounded by the batch and buffer sizes, never by the number of cells.

Output methods share, besides their scvi-tools arguments, `write_to` (the key to write the output to; None
computes it in memory and returns it, as scvi-tools) and the options of outputs.runner.OutputRequest:
    output_store  where outputs go: None for the input store, or the path of a separate AnnData store
    overwrite     replace an existing output of that key (otherwise refused)
    client        a dask.distributed Client: chunks fan out over its workers (each loads the model once)
    model_dir     where the workers load the model from (default: the model is saved to a temporary folder)
    seed          seeds every random draw, keyed by cell (outputs/jobs.py): same seed, same values
    chunk_rows    cells per chunk and per written row chunk (default: the store's chunk_rows)
Written outputs come back as lazy dask arrays over the Zarr (outputs.read_output); a write that stopped half way
resumes where it stopped when called again with the same arguments (outputs/writer.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scvi_scale import distributed, persist, surgery
from scvi_scale.data import CountStore, Registry, StoreError, write_store
from scvi_scale.data.aligned import AlignedStore
from scvi_scale.data.registry import library_log_stats
from scvi_scale.module import VAE, to_tensors
from scvi_scale.outputs import arguments, differential, jobs, writer
from scvi_scale.outputs.runner import ModelInputs, OutputRequest, OutputSpec, posterior_scales, run
from scvi_scale.sampler import BlockShuffleSampler, SequentialSampler, train_validation_split
from scvi_scale.train import TrainingConfig, fit, max_epochs_heuristic

logger = logging.getLogger("scvi_scale.model")

CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_INFERENCE_BATCH_SIZE = 1024
ANNDATA_UUID_KEY = "_scvi_scale_uuid"  # adata.uns entry naming the store setup_anndata wrote the AnnData to


class SCVI:
    """scVI (Lopez et al. 2018) on a Zarr store that `SCVI.setup_zarr` registered.

    Parameters are scvi-tools' `SCVI` ones, with its defaults; other keyword arguments go to the module (`VAE`):
    encode_covariates, deeply_inject_covariates, use_batch_norm, use_layer_norm, use_observed_lib_size.
    """

    # What setup_zarr registered, by store: scvi-tools keeps its set-ups in a class-level map the same way (keyed
    # by an AnnData's uuid). A model holds its own registry; this only carries it from setup_zarr to SCVI(path).
    _registries: dict[tuple[str, str | None], Registry] = {}
    # The stores setup_anndata wrote AnnDatas to, by the uuid it put in their uns, and the folders it made.
    _anndata_stores: dict[str, str] = {}
    _temporary_folders: list[tempfile.TemporaryDirectory] = []

    def __init__(
        self,
        store,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        latent_distribution: str = "normal",
        *,
        registry: Registry | None = None,
        **module_kwargs,
    ):
        if hasattr(store, "obs") and hasattr(store, "X"):  # an in-memory AnnData that setup_anndata wrote out
            store_path = self._anndata_stores.get(store.uns.get(ANNDATA_UUID_KEY))
            if store_path is None:
                raise StoreError("this AnnData has not been set up: call SCVI.setup_anndata(adata, batch_key=...) first")
            store = store_path
        path = os.fspath(store)
        if registry is None:
            registry = self._registries.get(_registry_key(path, getattr(store, "layer", None)))
            if registry is None:
                raise StoreError(
                    f"{path} has not been set up: call SCVI.setup_zarr({path!r}, batch_key=..., ...) first"
                )
        self.registry = registry
        self.store = store if isinstance(store, CountStore) else CountStore(path, layer=registry.layer)
        self.init_params = dict(
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            **module_kwargs,
        )
        if not module_kwargs.get("use_observed_lib_size", True):
            flat = [c for c, v in zip(registry.batch_categories, registry.library_log_vars, strict=True) if not v > 0]
            if flat:
                raise ValueError(
                    f"use_observed_lib_size=False puts a log-normal prior on each batch's library sizes, but batches "
                    f"{flat} of {registry.batch_key!r} have log library sizes of variance 0 (one cell, or equal "
                    "library sizes): keep the observed library (the default), or merge those batches"
                )
        self.module = VAE.from_registry(registry, **self.init_params)
        self.var_names = self.store.var_names
        self.is_trained = False
        self.history_: dict[str, list[tuple[int, float]]] = {}
        self.train_indices = self.validation_indices = None
        self._obs_arrays = None

    # --- set-up --------------------------------------------------------------------------------------------------

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
    ) -> Registry:
        """Register a store's fields for SCVI, like scvi-tools' `setup_anndata`, without loading X.

        One streaming pass over the counts validates them (finite, non-negative integers; the error names the rows)
        and computes the per-batch log-library mean and variance that the library prior needs. The store is only
        read. Returns the registry (also kept for `SCVI(path)`).
        """
        store = CountStore(path, layer=layer)
        registry = Registry.build(
            store,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )
        cls._registries[_registry_key(store.path, layer)] = registry
        return registry

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
        store_path=None,
    ) -> Registry:
        """scvi-tools' `setup_anndata` for an in-memory AnnData: its counts (X or `layer`), obs and var are written to
        a Zarr store (`store_path`, default a temporary folder removed when the process exits) and that store is
        registered, so `SCVI(adata)` trains on it like on any store. The AnnData gets a uuid in its uns (as
        scvi-tools' setup does) naming that store; its counts and obs are not modified."""
        if store_path is None:
            folder = tempfile.TemporaryDirectory(prefix="scvi-scale-anndata-")
            cls._temporary_folders.append(folder)
            store_path = Path(folder.name) / "adata.zarr"
        write_store(adata, store_path, layer=layer)
        adata.uns[ANNDATA_UUID_KEY] = uuid.uuid4().hex
        cls._anndata_stores[adata.uns[ANNDATA_UUID_KEY]] = str(store_path)
        return cls.setup_zarr(
            store_path,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )

    @property
    def obs_arrays(self) -> dict[str, np.ndarray]:
        """Per-cell encoded obs fields (batch, labels, covariates), aligned to store rows; read and checked once
        (the data boundary: the module's per-step path reads no values back)."""
        if self._obs_arrays is None:
            encoded = self.registry.encode(self.store)
            self.module.check_inputs(to_tensors(encoded, "cpu"))
            self._obs_arrays = encoded
        return self._obs_arrays

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # --- training ------------------------------------------------------------------------------------------------

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        train_size: float = 0.9,
        validation_size: float | None = None,
        batch_size: int = 128,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        seed: int = 0,
        block_rows: int | None = None,
        buffer_blocks: int | None = None,
        max_steps: int | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train with scvi-tools' defaults (Adam lr 1e-3, KL warm-up over 400 epochs, 90/10 split, batch 128).

        max_epochs: default scvi-tools' heuristic, min(400, round(20,000 / n_cells * 400)).
        plan_kwargs: optimiser settings (lr, weight_decay, eps, n_epochs_kl_warmup, n_steps_kl_warmup,
            reduce_lr_on_plateau, lr_factor, lr_patience, ...), as scvi-tools' TrainingPlan takes them.
        trainer_kwargs: early_stopping_patience, early_stopping_monitor, early_stopping_min_delta,
            check_val_every_n_epoch, checkpoint_every_n_steps.
        checkpoint_dir: where the checkpoint is written atomically each epoch; with resume=True a killed run
            continues from it and ends where an uninterrupted run would.
        seed: seeds the split, the sampler and torch, so two runs with the same seed are identical.
        block_rows, buffer_blocks: the sampler's shuffle block and buffer sizes (defaults: see sampler.py).

        Data-parallel: run this on every rank of a torch.distributed job (torchrun, or `distributed.launch`);
        each rank trains on its share of the training cells with `batch_size` cells per step (so a step averages
        world_size * batch_size cells) and validates on its share of the validation cells. Rank 0 writes the
        checkpoint; resume=True restores it on every rank. Save with `distributed.on_rank_zero`.
        """
        n_obs = self.store.n_obs
        config = TrainingConfig(
            max_epochs=max_epochs or max_epochs_heuristic(n_obs),
            early_stopping=early_stopping,
            **(plan_kwargs or {}),
            **trainer_kwargs,
        )
        device = distributed.setup(_resolve_device(accelerator))
        rank, world_size = distributed.world()
        torch.manual_seed(distributed.rank_seed(seed))
        self.train_indices, self.validation_indices = train_validation_split(
            n_obs, train_size=train_size, validation_size=validation_size, seed=seed
        )
        train_stream = BlockShuffleSampler(
            self.store,
            self.train_indices,
            batch_size=batch_size,
            obs_arrays=self.obs_arrays,
            seed=seed,
            rank=rank,
            world_size=world_size,
            block_rows=block_rows,
            buffer_blocks=buffer_blocks,
        )
        validation_share = np.array_split(self.validation_indices, world_size)[rank]
        validation_stream = None
        if len(self.validation_indices) >= world_size:  # every rank validates, or none does
            validation_stream = SequentialSampler(
                self.store, validation_share, batch_size=max(batch_size, DEFAULT_INFERENCE_BATCH_SIZE),
                obs_arrays=self.obs_arrays,
            )
        checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
        state = fit(
            self.module,
            train_stream,
            validation_stream,
            config,
            device=device,
            checkpoint_path=checkpoint_path,
            resume=resume,
            max_steps=max_steps,
        )
        self.history_ = state.history
        self.is_trained = bool(state.history) or state.global_step > 0
        self.module.eval()

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics as scvi-tools shows them: metric name -> DataFrame indexed by epoch."""
        return persist.history_frames(self.history_)

    # --- evaluation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _per_cell(self, compute, indices=None, batch_size=None) -> np.ndarray:
        """Stack `compute(tensors)` (a (B, ...) tensor) over the cells of `indices`, in store order per chunk."""
        self.module.eval()
        rows = None if indices is None else np.asarray(indices, dtype=np.int64)
        stream = SequentialSampler(
            self.store, rows, batch_size=batch_size or DEFAULT_INFERENCE_BATCH_SIZE, obs_arrays=self.obs_arrays
        )
        parts = [compute(to_tensors(minibatch, self.device)).cpu().numpy() for minibatch in stream]
        return np.concatenate(parts, axis=0)

    def get_elbo(self, indices=None, batch_size: int | None = None, return_mean: bool = True):
        """The ELBO per cell (reconstruction log-likelihood minus KL; higher is better), or its mean."""
        def elbo_per_cell(tensors):
            losses = self.module.loss(tensors)
            return -(losses["reconstruction_loss"] + losses["kl_local"])

        elbo = self._per_cell(elbo_per_cell, indices, batch_size)
        return float(elbo.mean()) if return_mean else elbo

    def get_reconstruction_error(self, indices=None, batch_size: int | None = None, return_mean: bool = True):
        """{"reconstruction_loss": -log p(x | z) averaged over cells (per cell if not return_mean)}, as scvi-tools."""
        loss = self._per_cell(lambda t: self.module.loss(t)["reconstruction_loss"], indices, batch_size)
        return {"reconstruction_loss": float(loss.mean()) if return_mean else loss}

    def get_marginal_ll(
        self, indices=None, n_mc_samples: int = 1000, batch_size: int | None = None, return_mean: bool = True
    ):
        """Importance-sampled estimate of log p(x) per cell (higher is better), or its mean over cells."""
        ll = self._per_cell(lambda t: self.module.marginal_ll(t, n_mc_samples=n_mc_samples), indices, batch_size)
        return float(ll.mean()) if return_mean else ll

    # --- outputs -------------------------------------------------------------------------------------------------

    def _inputs(self) -> ModelInputs:
        return ModelInputs(self.module, self.store, self.obs_arrays, save=lambda folder: self.save(folder, True))

    def get_latent_representation(
        self,
        indices=None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        *,
        write_to: str | None = None,
        **options,
    ):
        """The posterior mean of z (n_cells, n_latent), cells in the order of `indices`, computed chunk by chunk.

        give_mean=False draws one sample per cell; for latent_distribution="ln" the mean is estimated from
        `mc_samples` samples pushed through the softmax. return_dist=True gives (mean, variance) of q(z | x).
        Draws are keyed by `seed` and cell, so a cell gets the same values whatever else is computed with it.
        write_to: obsm/<key> (n_obs, n_latent) float32, and with return_dist the variance as obsm/<key>_var; returns
        the lazy array(s). See the module docstring for the output options.
        """
        request = OutputRequest.of_call(indices=indices, batch_size=batch_size, **options)
        job = jobs.LatentJob(give_mean=give_mean, mc_samples=mc_samples, return_dist=return_dist)
        specs = None
        if write_to is not None:
            n_latent = self.module.n_latent
            specs = {"latent": OutputSpec("obsm", write_to, "dense", n_latent)}
            if return_dist:
                specs["variance"] = OutputSpec("obsm", f"{write_to}_var", "dense", n_latent)
        result = run(self._inputs(), job, request, specs, {"method": "get_latent_representation",
                     "give_mean": give_mean, "mc_samples": mc_samples, "return_dist": return_dist}, "latent")
        return (result["latent"], result["variance"]) if return_dist else result["latent"]

    def write_latent_representation(self, key: str = "X_scvi", **kwargs):
        """get_latent_representation(write_to=key, ...) of every cell: obsm/<key> (and obsm/<key>_var)."""
        return self.get_latent_representation(write_to=key, **kwargs)

    def get_latent_library_size(
        self, indices=None, give_mean: bool = True, batch_size: int | None = None, *, write_to: str | None = None,
        **options,
    ):
        """The library size l_n per cell, (n_cells, 1): the mean of q(l | x) (give_mean) or exp of the observed or
        sampled log library. write_to: obsm/<key>."""
        if give_mean and self.module.use_observed_lib_size:
            raise RuntimeError(
                "The module for this model does not compute the posterior distribution for the library size. Set "
                "`give_mean` to False to use the observed library size instead."
            )
        request = OutputRequest.of_call(indices=indices, batch_size=batch_size, **options)
        specs = None if write_to is None else {"library": OutputSpec("obsm", write_to, "dense", 1)}
        result = run(self._inputs(), jobs.LibraryJob(give_mean=give_mean), request, specs,
                     {"method": "get_latent_library_size", "give_mean": give_mean}, "library size")
        return result["library"]

    def get_normalized_expression(
        self,
        indices=None,
        transform_batch=None,
        gene_list=None,
        library_size: float | str = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        *,
        write_to: str | None = None,
        **options,
    ):
        """The decoded expression rho_n: px_scale scaled to library_size (library_size="latent": px_rate).

        transform_batch: None (each cell's own batch), a batch category, or a list of them (the expression is
        averaged over the batches, one posterior draw per batch, as scvi-tools does). Returns, as scvi-tools: a
        DataFrame (cells x genes) unless return_numpy, or an (n_samples, n_cells, n_genes) array for n_samples > 1
        without return_mean; with n_samples_overall, (n_samples_overall, n_genes) draws for cells picked uniformly
        at random (with replacement) among `indices` (scvi-tools draws n_samples_overall // n_cells + 1 per cell
        and keeps n_samples_overall of them at random: the same distribution, at a fraction of the cost).
        write_to: layers/<key>, dense float32 (n_obs x n_vars; needs all genes and one value per cell).
        """
        transform = arguments.batch_codes(self.registry.batch_categories, transform_batch)
        genes = arguments.gene_positions(self.var_names, gene_list)
        if not (library_size == "latent" or (isinstance(library_size, (int, float)) and library_size > 0)):
            raise ValueError(f"library_size={library_size!r}: expected a positive number or 'latent'")
        request = OutputRequest.of_call(indices=indices, batch_size=batch_size, silent=silent, **options)
        if n_samples_overall is not None:
            if n_samples != 1:
                raise ValueError("pass either n_samples or n_samples_overall, not both")
            if write_to is not None:
                raise writer.OutputError("n_samples_overall draws are not per cell, so they cannot be written")
            rows = np.arange(self.store.n_obs) if indices is None else request.indices
            picked = np.random.default_rng(request.seed).choice(rows, size=n_samples_overall, replace=True)
            scales = posterior_scales(
                self._inputs(), request, np.tile(picked, len(transform)), np.repeat(transform, len(picked)),
                genes=genes, library_size=library_size,
            )
            return scales.reshape(len(transform), n_samples_overall, -1).mean(0)
        job = jobs.ExpressionJob(transform_batches=transform, genes=genes, library_size=library_size,
                                 n_samples=n_samples, return_mean=return_mean)
        if write_to is not None:
            if genes is not None:
                raise writer.OutputError("a layer holds every gene: write without gene_list (select genes when reading)")
            if n_samples > 1 and not return_mean:
                raise writer.OutputError("a layer holds one value per cell and gene: use return_mean=True to write")
            specs = {"expression": OutputSpec("layers", write_to, "dense", self.store.n_vars)}
            record = {"method": "get_normalized_expression", "transform_batch": [None if b == jobs.OWN_BATCH else b
                      for b in transform], "library_size": library_size, "n_samples": n_samples}
            return run(self._inputs(), job, request, specs, record, "normalized expression")["expression"]
        expression = run(self._inputs(), job, request, description="normalized expression")["expression"]
        if n_samples > 1 and not return_mean:
            return np.moveaxis(expression, 1, 0)
        if return_numpy:
            return expression
        names = self.store.obs_names if indices is None else self.store.obs_names[request.indices]
        columns = pd.Index(self.var_names) if genes is None else pd.Index(self.var_names)[list(genes)]
        return pd.DataFrame(expression, index=names, columns=columns)

    def get_likelihood_parameters(
        self, indices=None, n_samples: int = 1, give_mean: bool = False, batch_size: int | None = None, *,
        write_to: str | None = None, **options,
    ) -> dict:
        """The likelihood's parameters per cell and gene: {"mean": px_rate, "dispersions": theta (NB, ZINB),
        "dropout": sigmoid(zi_logits) (ZINB)}, (n_cells, n_genes) each, or (n_samples, n_cells, n_genes) for
        n_samples > 1 without give_mean. write_to: layers/<key>_mean, <key>_dispersions, <key>_dropout."""
        request = OutputRequest.of_call(indices=indices, batch_size=batch_size, **options)
        job = jobs.LikelihoodJob(n_samples=n_samples, give_mean=give_mean)
        names = ["mean"]
        if self.module.gene_likelihood != "poisson":
            names.append("dispersions")
        if self.module.gene_likelihood == "zinb":
            names.append("dropout")
        if write_to is not None:
            if n_samples > 1 and not give_mean:
                raise writer.OutputError("a layer holds one value per cell and gene: use give_mean=True to write")
            specs = {name: OutputSpec("layers", f"{write_to}_{name}", "dense", self.store.n_vars) for name in names}
            record = {"method": "get_likelihood_parameters", "n_samples": n_samples, "give_mean": give_mean}
            return run(self._inputs(), job, request, specs, record, "likelihood parameters")
        values = run(self._inputs(), job, request, description="likelihood parameters")
        if n_samples > 1 and not give_mean:
            values = {name: np.moveaxis(value, 1, 0) for name, value in values.items()}
        return values

    def posterior_predictive_sample(
        self, indices=None, transform_batch=None, n_samples: int = 1, gene_list=None, batch_size: int | None = None,
        silent: bool = True, *, write_to: str | None = None, **options,
    ):
        """Counts drawn from the posterior predictive p(x_hat | x): a draw of q(z, l | x), then of the fitted
        NB / ZINB / Poisson. Returns a float32 CSR (n_cells, n_genes) for n_samples=1, else a list of n_samples
        of them (scvi-tools returns one (n_cells, n_genes, n_samples) sparse array). write_to: layers/<key>
        (n_samples=1) or layers/<key>_0 ... <key>_{n_samples-1}, CSR."""
        transform = arguments.batch_codes(self.registry.batch_categories, transform_batch)
        genes = arguments.gene_positions(self.var_names, gene_list)
        request = OutputRequest.of_call(indices=indices, batch_size=batch_size, silent=silent, **options)
        job = jobs.PosteriorPredictiveJob(transform_batches=transform, genes=genes, n_samples=n_samples)
        names = [f"sample_{draw}" for draw in range(n_samples)]
        specs = None
        if write_to is not None:
            if genes is not None:
                raise writer.OutputError("a layer holds every gene: write without gene_list (select genes when reading)")
            keys = [write_to] if n_samples == 1 else [f"{write_to}_{draw}" for draw in range(n_samples)]
            specs = {name: OutputSpec("layers", key, "csr", self.store.n_vars) for name, key in zip(names, keys)}
        record = {"method": "posterior_predictive_sample", "transform_batch": [None if b == jobs.OWN_BATCH else b
                  for b in transform], "n_samples": n_samples}
        values = run(self._inputs(), job, request, specs, record, "posterior predictive")
        return values[names[0]] if n_samples == 1 else [values[name] for name in names]

    def differential_expression(
        self,
        groupby: str | None = None,
        group1=None,
        group2=None,
        idx1=None,
        idx2=None,
        mode: str = "vanilla",
        delta: float | None = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1=None,
        batchid2=None,
        fdr_target: float = 0.05,
        silent: bool = False,
        *,
        n_samples_overall: int = 5000,
        use_permutation: bool = False,
        m_permutation: int = 10000,
        pseudocounts: float | None = None,
        threshold_counts: float = 0.01,
        test_mode: str = "three",
        write_to: str | None = None,
        table_path=None,
        max_sample_bytes: int = differential.DE_SAMPLE_BYTES,
        **options,
    ) -> pd.DataFrame:
        """scVI's Bayesian differential expression (vanilla: Lopez et al. 2018; change: Boyeau et al. 2019), as
        scvi-tools' differential_expression with its get_bayes_factors options, columns and row order (see
        outputs/differential.py for how the cells are gathered). Results are one DataFrame (index: gene names, one
        block of rows per comparison); write_to also writes it as uns/<key>, table_path as a parquet file (csv
        when pyarrow is missing). Memory: at most max_sample_bytes of posterior samples at once, plus one chunk of
        counts.
        """
        de_options = differential.DEOptions(
            mode=mode, delta=delta, all_stats=all_stats, batch_correction=batch_correction, batchid1=batchid1,
            batchid2=batchid2, fdr_target=fdr_target, n_samples_overall=n_samples_overall,
            use_permutation=use_permutation, m_permutation=m_permutation, pseudocounts=pseudocounts,
            threshold_counts=threshold_counts, test_mode=test_mode, max_sample_bytes=max_sample_bytes,
        )
        request = OutputRequest.of_call(batch_size=batch_size, silent=silent, **options)
        target = None if write_to is None else writer.output_store(self.store.path, request.output_store)
        if target is not None:
            writer.check_uns_key(target, write_to, request.overwrite)  # before the work, not after
        comparisons = differential.compare_groups(self.store, groupby, group1, group2, idx1, idx2)
        result = differential.differential_expression(
            self._inputs(), request, comparisons, de_options, list(self.registry.batch_categories), self.var_names
        )
        if target is not None:
            writer.write_uns(target, write_to, result, overwrite=request.overwrite)
        if table_path is not None:
            writer.write_table(result, table_path)
        return result

    # --- persistence ---------------------------------------------------------------------------------------------

    def _saved(self) -> persist.SavedModel:
        return persist.SavedModel(
            module_state=self.module.state_dict(),
            var_names=list(self.var_names),
            init_params=self.init_params,
            registry=self.registry,
            history=self.history_,
            is_trained=self.is_trained,
            train_indices=self.train_indices,
            validation_indices=self.validation_indices,
        )

    def save(self, dir_path, overwrite: bool = False, format: str = "scvi-scale") -> None:
        """Write `dir_path/model.pt`: weights, init parameters, registry, var names and history (no counts).
        format="scvi-tools" writes the directory scvi-tools' `SCVI.load` reads instead (see persist.py)."""
        persist.write_model(dir_path, self._saved(), module=self.module, overwrite=overwrite, format=format)

    @classmethod
    def load(cls, dir_path, store, accelerator: str = "cpu") -> SCVI:
        """Load a model that `save` (or scvi-tools' SCVI.save) wrote, over `store` (a path or CountStore) with the
        same genes in the same order."""
        return cls._from_saved(persist.read_model(dir_path), store, accelerator)

    @classmethod
    def _from_saved(cls, saved: persist.SavedModel, store, accelerator: str = "cpu") -> SCVI:
        """The one way a saved model becomes an SCVI over `store`."""
        registry = saved.registry
        if not isinstance(store, CountStore):
            store = CountStore(store, layer=registry.layer)
        registry.check_var_names(store)
        if registry.library_log_means is None:  # a scvi-tools model with an observed library does not save them
            statistics = library_log_stats(store, registry.encode(store)["batch"], registry.n_batch, validate=False)
            registry.library_log_means, registry.library_log_vars = statistics
        model = cls(store, registry=registry, **saved.init_params)
        model.module = saved.build_module().to(_resolve_device(accelerator))
        model.history_ = saved.history
        model.is_trained = saved.is_trained
        model.train_indices, model.validation_indices = saved.train_indices, saved.validation_indices
        return model

    # --- query mapping (scArches) --------------------------------------------------------------------------------

    @classmethod
    def prepare_query_zarr(cls, query_path, reference, layer: str | None = None) -> AlignedStore:
        """The query store aligned to the reference's genes (reference: a model or a model directory).

        Like scvi-tools' prepare_query_anndata, without rewriting anything: missing genes read as zeros (with a
        warning saying how many), extra genes are dropped, the order is the reference's. layer: default the
        reference registry's."""
        saved = _reference(reference)
        return AlignedStore(query_path, saved.var_names, layer=saved.registry.layer if layer is None else layer)

    @classmethod
    def load_query_data(
        cls,
        query_store,
        reference,
        accelerator: str = "cpu",
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_expression: bool = True,
        freeze_decoder_first_layer: bool = True,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = False,
        freeze_classifier: bool = True,
    ) -> SCVI:
        """A model over `query_store` holding the reference's weights, its batch encoding extended, ready to train.

        query_store: a path or CountStore; one whose genes differ from the reference's is aligned first
        (prepare_query_zarr). reference: a model or a directory written by SCVI.save. The freeze options are
        scvi-tools' (see surgery.py); unfrozen=True trains everything; freeze_classifier applies to SCANVI only
        and is accepted for the same signature. The query's obs must have the reference's batch column; labels are
        not needed (except by dispersion "gene-label").
        """
        del freeze_classifier  # no classifier in SCVI
        saved = _reference(reference)
        reference_registry = saved.registry
        if reference_registry.batch_key is None:
            raise StoreError(
                "the reference was set up without a batch_key: scArches maps query batches through the batch "
                "covariate, so train the reference with one"
            )
        if not isinstance(query_store, CountStore):
            query_store = AlignedStore(query_store, saved.var_names, layer=reference_registry.layer)
        elif not query_store.var_names.equals(pd.Index(saved.var_names)):
            query_store = AlignedStore(query_store.path, saved.var_names, layer=query_store.layer)
        if saved.init_params.get("dispersion") != "gene-label":
            # labels only feed the "gene-label" dispersion: the query need not have them (codes read as 0)
            reference_registry = dataclasses.replace(reference_registry, labels_key=None)
        model = cls(query_store, registry=reference_registry.extend_batches(query_store), **saved.init_params)
        surgery.transfer_reference_weights(model.module, saved.module_state, reference_registry.n_batch)
        surgery.freeze_for_query(
            model.module,
            reference_registry.n_batch,
            unfrozen=unfrozen,
            freeze_dropout=freeze_dropout,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        )
        model.module.to(_resolve_device(accelerator)).eval()
        return model

    def __repr__(self) -> str:
        params = ", ".join(f"{k}: {v!r}" for k, v in self.init_params.items())
        status = "trained" if self.is_trained else "not trained"
        return (
            f"SCVI model with the following parameters:\n{params}\n"
            f"Store: {self.store!r}\nTraining status: {status}"
        )


def _reference(reference) -> persist.SavedModel:
    """A reference for query mapping: a model directory (read) or a model (its saved form)."""
    if isinstance(reference, (str, os.PathLike)):
        return persist.read_model(reference)
    return reference._saved()


def _registry_key(path, layer) -> tuple[str, str | None]:
    return (str(Path(path).resolve()), layer)


def _resolve_device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if accelerator != "auto":
            raise RuntimeError(f"accelerator={accelerator!r} but torch sees no CUDA device")
        return torch.device("cpu")
    return torch.device(accelerator)
