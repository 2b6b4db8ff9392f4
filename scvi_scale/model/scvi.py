"""`SCVI`: scvi-tools' `SCVI` over AnnDatas and Zarr stores, with its method names, arguments and defaults.

    >>> from scvi_scale import SCVI
    >>> SCVI.setup_anndata(adata, batch_key="batch")           # in place, as scvi-tools; or SCVI.setup_zarr(path)
    >>> model = SCVI(adata, n_latent=10)                        # or SCVI("atlas.zarr", ...)
    >>> model.train(max_epochs=20, early_stopping=True)
    >>> adata.obsm["X_scVI"] = model.get_latent_representation()
    >>> model.save("model_dir/", save_anndata=True); model = SCVI.load("model_dir/", adata)

This is the one place that ties the data (`data`), the sampler, the torch module, the training loop (`train`),
the outputs (`outputs`) and model directories (`persist`) together. Every method turns scvi-tools' arguments into
what the layers below take and hands over. A model reads its cells from a Zarr store (streamed in row blocks,
never loaded whole) or from an AnnData in place (sources.py); every method that takes `adata` in scvi-tools takes
an AnnData or a store here.

Output methods take, besides their scvi-tools arguments, `write_to` (a key to write the output to: into the store,
chunk by chunk and resumable, or into the AnnData's obsm / layers; None returns it, as scvi-tools) and the options
of outputs.runner.OutputRequest:
    output_store  where store outputs go: None for the input store, or the path of a separate AnnData store
    overwrite     replace an existing output of that key (otherwise refused)
    client        a dask.distributed Client: chunks fan out over its workers (each loads the model once)
    model_dir     where the workers load the model from (default: the model is saved to a temporary folder)
    seed          seeds every random draw, keyed by cell (outputs/jobs.py): same seed, same values
    chunk_rows    cells per chunk and per written row chunk (default: the store's chunk_rows)
scvi-tools' data-loader keyword arguments are accepted and ignored with a warning (compat.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scvi_scale import distributed, persist, surgery
from scvi_scale.data import CountStore, Registry, StoreCollection, StoreError, remote
from scvi_scale.data.aligned import AlignedStore
from scvi_scale.data.anndata_source import AnnDataSource
from scvi_scale.data.registry import library_log_stats
from scvi_scale.model import compat, sources
from scvi_scale.model.query import pad_and_sort
from scvi_scale.module import VAE, to_tensors
from scvi_scale.outputs import arguments, differential, jobs, writer
from scvi_scale.outputs.importance import ImportanceOptions, importance_sample
from scvi_scale.outputs.runner import ModelInputs, OutputRequest, OutputSpec, posterior_scales, run
from scvi_scale.sampler import BlockShuffleSampler, SequentialSampler, train_validation_split
from scvi_scale.settings import settings
from scvi_scale.train import TrainingConfig, fit, max_epochs_heuristic

logger = logging.getLogger("scvi_scale.model")

CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_INFERENCE_BATCH_SIZE = 1024
MINIFIED_TYPE = "latent_posterior_parameters"
OBSERVED_LIBRARY_KEY = "observed_lib_size"  # scvi-tools' obs column of a minified AnnData
CHECKED_CELLS = 1 << 20  # cells whose obs codes are range-checked at once (int64 while checked: 8 MB a field)
IGNORED_LOADER = "scvi-scale reads the data itself, in threads (the method's batch_size sets the forward pass)"
IGNORED_TRAINER = "scvi-scale trains in its own loop, not Lightning's"
IMPORTANCE_KEYS = tuple(field.name for field in dataclasses.fields(ImportanceOptions))


class SCVI:
    """scVI (Lopez et al. 2018) over an AnnData set up with `setup_anndata` or a store set up with `setup_zarr`.

    Parameters are scvi-tools' `SCVI` ones, with its defaults; other keyword arguments go to the module (`VAE`):
    log_variational, encode_covariates, deeply_inject_covariates, batch_representation, batch_embedding_kwargs,
    use_batch_norm, use_layer_norm, var_activation, extra_encoder_kwargs, extra_decoder_kwargs.
    """

    def __init__(
        self,
        adata=None,
        registry: Registry | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        use_observed_lib_size: bool = True,
        latent_distribution: str = "normal",
        **kwargs,
    ):
        if adata is None:
            raise ValueError("SCVI needs its data: an AnnData set up with SCVI.setup_anndata, or a store path set "
                             "up with SCVI.setup_zarr (a datamodule-only model is not supported)")
        if not isinstance(registry, Registry):  # None, or scvi-tools' registry dict (for data-less models)
            registry = sources.setup_of(adata)
        ignored = [key for key in ("extra_payload_autotune", "use_size_factor_key") if key in kwargs]
        compat.explain_ignored("SCVI", ignored, "size factors are read from the registry (size_factor_key) and our "
                                                "decoder keeps its softmax; autotune payloads are not produced")
        kwargs = {key: value for key, value in kwargs.items() if key not in ignored}
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
            **kwargs,
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

    # --- set-up --------------------------------------------------------------------------------------------------

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
        """scvi-tools' setup_anndata, in place: the fields are registered (one pass over the counts checks them
        and computes the per-batch library statistics), a uuid goes into adata.uns["_scvi_uuid"], and nothing
        else of the AnnData is changed or copied. Columns added to obs later are seen by the outputs."""
        compat.explain_ignored("setup_anndata", kwargs, "no other fields are registered for SCVI")
        source = AnnDataSource(adata, layer=layer)
        sources.remember_anndata_setup(adata, Registry.build(
            source, batch_key=batch_key, labels_key=labels_key, size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys, continuous_covariate_keys=continuous_covariate_keys,
        ))

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
        join: str = "inner",
        store_key: str | None = None,
        storage_options: dict | None = None,
    ) -> Registry:
        """Register a store's fields for SCVI, as setup_anndata does for an AnnData, without loading X.

        One streaming pass over the counts validates them (finite, non-negative integers; the error names the rows)
        and computes the per-batch log-library mean and variance that the library prior needs. The store is only
        read. Returns the registry (also kept for `SCVI(path)`).

        path may be a list of stores (an atlas that comes as many files), read as one without concatenating them:
        genes joined as anndata.concat does (join "inner" or "outer", recorded in the registry), store_key names
        an obs column holding each cell's store (to give batches per store: batch_key=store_key); the sampler
        draws blocks across all stores and every written output goes back into the store its cells came from.

        path may be a URL (s3://, gs://, https://); storage_options (fsspec's: credentials, endpoint_url, ...) are
        kept in memory for it, so SCVI(path) and the outputs reach it too; they are never saved (data.remote).
        """
        if isinstance(path, (list, tuple)):
            for url in path:
                remote.remember_options(os.fspath(url), storage_options)
        if sources.is_collection(path):
            keys = None if isinstance(path, StoreCollection) else [Path(os.fspath(p)).stem for p in path]
            store = path if isinstance(path, StoreCollection) else StoreCollection(
                list(path), join=join, layer=layer, label=store_key, keys=keys)
        else:
            store = CountStore(path, layer=layer, storage_options=storage_options)
        registry = Registry.build(
            store, batch_key=batch_key, labels_key=labels_key, size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys, continuous_covariate_keys=continuous_covariate_keys,
        )
        if isinstance(store, StoreCollection):
            registry.collection = store.describe()
        sources.remember_store_setup(store, registry)
        return registry

    def view_anndata_setup(self, adata=None, hide_state_registries: bool = False) -> None:
        """Print the set-up: the data, the registered fields and, unless hide_state_registries, their categories."""
        source = self.store if adata is None else self._source(adata)
        registry = self.registry
        lines = [f"Set-up of {source!r}", f"  layer: {registry.layer or 'X'}; {registry.n_vars} genes"]
        fields = [("batch", registry.batch_key, registry.batch_categories),
                  ("labels", registry.labels_key, registry.label_categories)]
        fields += [("categorical covariate", key, registry.categorical_covariate_categories[key])
                   for key in registry.categorical_covariate_keys]
        for role, key, categories in fields:
            shown = "" if hide_state_registries else f": {list(categories)[:20]}"
            lines.append(f"  {role} {key!r}: {len(categories)} categories{shown}" if key else f"  {role}: none")
        for key in registry.continuous_covariate_keys:
            lines.append(f"  continuous covariate {key!r}")
        if registry.size_factor_key:
            lines.append(f"  size factor {registry.size_factor_key!r}")
        print("\n".join(lines))

    def to_device(self, device: str | int | torch.device) -> None:
        """Move the module to `device` ("cpu", "cuda", "cuda:1", or a CUDA device index)."""
        self.module.to(torch.device(f"cuda:{device}" if isinstance(device, int) else device))

    # --- data ----------------------------------------------------------------------------------------------------

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
            encoded.update(self._cached_posterior(source))
        if source is self.store:
            self._obs_arrays = encoded
        return encoded

    @property
    def obs_arrays(self) -> dict[str, np.ndarray]:
        """Per-cell encoded obs fields (batch, labels, covariates) of the model's own data."""
        return self._encoded(self.store)

    def _inputs(self, adata=None) -> ModelInputs:
        source = self._source(adata)
        return ModelInputs(self.module, source, self._encoded(source),
                           save=lambda folder: self.save(folder, overwrite=True),
                           minified=self.minified_data_type is not None)

    def _request(self, method: str, inputs: ModelInputs, indices, batch_size, silent=True, kwargs=None,
                 ignorable=compat.DATA_LOADER_ARGUMENTS) -> OutputRequest:
        """The OutputRequest of one call: our options from kwargs, scvi-tools' data-loader arguments explained."""
        options = compat.split_known(kwargs or {}, OutputRequest.OPTIONS, method, ignorable, IGNORED_LOADER)
        if isinstance(inputs.store, AnnDataSource) and options.get("client") is not None:
            raise ValueError(f"{method}: a model over an in-memory AnnData runs here; dask workers need a store "
                             "(scvi_scale.data.write_store(adata, 'cells.zarr'))")
        return OutputRequest.of_call(indices=sources.cell_positions(indices, inputs.store.n_obs),
                                     batch_size=batch_size, silent=silent, **options)

    def _deliver(self, inputs, job, request, specs, record, description) -> dict:
        """Run `job`: into the store when written to a store (specs), into the AnnData's obsm / layers when the
        data is an AnnData, else in memory. Returns {name: values} (lazy arrays for a store)."""
        if specs is None or not isinstance(inputs.store, AnnDataSource):
            return run(inputs, job, request, specs, record, description)
        if request.output_store is not None:
            raise ValueError("output_store= writes a Zarr store's outputs; for an AnnData the outputs go into it")
        values = run(inputs, job, request.replace(indices=None), None, None, description)
        adata = inputs.store.adata
        for name, spec in specs.items():
            entries = adata.obsm if spec.group == "obsm" else adata.layers
            if spec.key in entries and not request.overwrite:
                raise writer.OutputError(f"{spec.group}[{spec.key!r}] exists in the AnnData; pass overwrite=True")
            entries[spec.key] = values[name]
        return values

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
        90/10 split, batch 128; no validation unless early stopping, LR on plateau or check_val_every_n_epoch asks
        for it).

        max_epochs: default scvi-tools' heuristic, min(400, round(20,000 / n_cells * 400)).
        plan_kwargs / plan_config: scvi-tools' TrainingPlan options (lr, weight_decay, eps, optimizer "Adam" or
            "AdamW", n_epochs_kl_warmup, n_steps_kl_warmup, max_kl_weight, min_kl_weight, reduce_lr_on_plateau,
            lr_factor, lr_patience, lr_threshold, lr_min, lr_scheduler_metric).
        trainer_kwargs / trainer_config: check_val_every_n_epoch, early_stopping_monitor, early_stopping_patience,
            early_stopping_min_delta, early_stopping_warmup_epochs, enable_progress_bar, gradient_clip_val,
            max_steps, checkpoint_every_n_steps; Lightning's other arguments are accepted and ignored (warned).
        datasplitter_kwargs: drop_last; data-loader options are accepted and ignored (warned).
        checkpoint_dir: where the checkpoint is written atomically each epoch; with resume=True a killed run
            continues from it and ends where an uninterrupted run would.
        seed: seeds the split, the sampler and torch (default settings.seed, which also drew the initial weights),
            so two runs with the same seed are identical on the same machine and thread count.
        block_rows, buffer_blocks: the sampler's shuffle block and buffer sizes (defaults: see sampler.py).

        Data-parallel: run this on every rank of a torch.distributed job (torchrun, or `distributed.launch`);
        each rank trains on its share of the training cells with `batch_size` cells per step. Rank 0 writes the
        checkpoint; resume=True restores it on every rank. Save with `distributed.on_rank_zero`.
        """
        compat.refuse("train", datamodule=datamodule)
        if self.minified_data_type is not None:
            raise ValueError("a minified model holds no counts to train on; train the full model")
        if devices not in ("auto", 1, [0], "1"):
            compat.explain_ignored("train", ["devices"], "one process trains on one device; for several, run "
                                                         "under torchrun or `scvi-scale train --nproc N`")
        if load_sparse_tensor:
            compat.explain_ignored("train", ["load_sparse_tensor"], "sparse counts are always read as CSR")
        splitter = compat.split_known(datasplitter_kwargs or {}, ("drop_last",), "train", compat.DATA_LOADER_ARGUMENTS,
                                      IGNORED_LOADER)
        config, progress_bar, max_steps = _training_config(
            max_epochs or max_epochs_heuristic(self.store.n_obs), early_stopping,
            {**(plan_config or {}), **(plan_kwargs or {})}, {**(trainer_config or {}), **trainer_kwargs},
        )
        seed = settings.seed if seed is None else seed
        device = distributed.setup(_resolve_device(accelerator))
        rank, world_size = distributed.world()
        torch.manual_seed(distributed.rank_seed(seed))
        n_obs = self.store.n_obs
        self.train_indices, self.validation_indices = train_validation_split(
            n_obs, train_size=0.9 if train_size is None else train_size, validation_size=validation_size,
            seed=seed, shuffle=shuffle_set_split,
        )
        obs_arrays = self.obs_arrays
        # a CSR store's minibatches stay CSR: the module reads the non-zeros (its likelihood and log1p), and
        # building the dense counts would cost the training thread more than the first layer's densifying scatter
        csr_only = {"return_csr": self.store.is_sparse, "dense": not self.store.is_sparse}
        train_stream = BlockShuffleSampler(
            self.store, self.train_indices, batch_size=batch_size, obs_arrays=obs_arrays, seed=seed, rank=rank,
            world_size=world_size, block_rows=block_rows, buffer_blocks=buffer_blocks,
            drop_last=bool(splitter.get("drop_last", False)), **csr_only,
        )
        validation_share = np.array_split(self.validation_indices, world_size)[rank]
        validation_stream = None
        if len(self.validation_indices) >= world_size and config.validation_every is not None:
            validation_stream = SequentialSampler(
                self.store, validation_share, batch_size=max(batch_size, DEFAULT_INFERENCE_BATCH_SIZE),
                obs_arrays=obs_arrays, **csr_only,
            )
        checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
        started = time.perf_counter()
        with _progress_bars(progress_bar):
            state = fit(self.module, train_stream, validation_stream, config, device=device,
                        checkpoint_path=checkpoint_path, resume=resume, max_steps=max_steps)
        seconds = time.perf_counter() - started
        self.run_info = {
            "seconds": round(seconds, 2),
            "epochs": len(state.history.get("train_loss", [])),
            # per epoch, from its own clock: a resumed run's time before the kill is not in `seconds`
            "train_cells_per_second": round(len(self.train_indices) / float(np.median(epoch_seconds)), 1)
            if (epoch_seconds := [value for _, value in state.history.get("epoch_seconds", [])]) else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "processes": world_size,
        }
        self.history_ = state.history
        self.is_trained = bool(state.history) or state.global_step > 0
        self.module.eval()

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics as scvi-tools shows them: metric name -> DataFrame indexed by epoch."""
        return persist.history_frames(self.history_)

    # --- evaluation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _per_cell(self, method: str, compute, adata, indices, batch_size, dataloader, kwargs) -> np.ndarray:
        """Stack `compute(tensors)` (a (B, ...) tensor) over the cells of `indices`, in store order."""
        compat.refuse(method, dataloader=dataloader)
        compat.explain_ignored(method, kwargs or {}, IGNORED_LOADER)
        if self.minified_data_type is not None:
            raise ValueError(f"{method} reads the counts, which a minified model does not hold")
        self.module.eval()
        source = self._source(adata)
        rows = sources.cell_positions(indices, source.n_obs)
        stream = SequentialSampler(source, None if rows is None else np.unique(rows),
                                   batch_size=batch_size or DEFAULT_INFERENCE_BATCH_SIZE,
                                   obs_arrays=self._encoded(source))
        parts = [compute(to_tensors(minibatch, self.device)).cpu().numpy() for minibatch in stream]
        return np.concatenate(parts, axis=0)

    def get_elbo(self, adata=None, indices=None, batch_size: int | None = None, dataloader=None,
                 return_mean: bool = True, data_loader_kwargs: dict | None = None, **kwargs):
        """The ELBO per cell (reconstruction log-likelihood minus KL; higher is better, as scvi-tools returns it),
        or its mean."""
        def elbo_per_cell(tensors):
            losses = self.module.loss(tensors)
            return -(losses["reconstruction_loss"] + losses["kl_local"])

        elbo = self._per_cell("get_elbo", elbo_per_cell, adata, indices, batch_size, dataloader,
                              {**(data_loader_kwargs or {}), **kwargs})
        return float(elbo.mean()) if return_mean else elbo

    def get_reconstruction_error(self, adata=None, indices=None, batch_size: int | None = None, dataloader=None,
                                 return_mean: bool = True, data_loader_kwargs: dict | None = None, **kwargs):
        """{"reconstruction_loss": -log p(x | z) averaged over cells (per cell if not return_mean)}, as scvi-tools."""
        loss = self._per_cell("get_reconstruction_error", lambda t: self.module.loss(t)["reconstruction_loss"],
                              adata, indices, batch_size, dataloader, {**(data_loader_kwargs or {}), **kwargs})
        return {"reconstruction_loss": float(loss.mean()) if return_mean else loss}

    def get_marginal_ll(self, adata=None, indices=None, n_mc_samples: int = 1000, batch_size: int | None = None,
                        return_mean: bool = True, dataloader=None, data_loader_kwargs: dict | None = None,
                        **kwargs):
        """Importance-sampled estimate of log p(x) per cell (higher is better), or its mean over cells.
        n_mc_samples_per_pass (in kwargs, as scvi-tools passes it to the module): draws decoded at once."""
        per_pass = int(kwargs.pop("n_mc_samples_per_pass", 1))
        ll = self._per_cell(
            "get_marginal_ll",
            lambda t: self.module.marginal_ll(t, n_mc_samples=n_mc_samples, n_mc_samples_per_pass=per_pass),
            adata, indices, batch_size, dataloader, {**(data_loader_kwargs or {}), **kwargs},
        )
        return float(ll.mean()) if return_mean else ll

    # --- latent space ----------------------------------------------------------------------------------------

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
        """The posterior mean of z (n_cells, n_latent), cells in the order of `indices`, computed chunk by chunk.

        give_mean=False draws one sample per cell; for latent_distribution="ln" the mean is estimated from
        `mc_samples` samples pushed through the softmax. return_dist=True gives (mean, variance) of q(z | x).
        Draws are keyed by `seed` and cell, so a cell gets the same values whatever else is computed with it.
        write_to: obsm/<key> (n_obs, n_latent) float32, and with return_dist the variance as obsm/<key>_var.
        """
        compat.refuse("get_latent_representation", dataloader=dataloader)
        inputs = self._inputs(adata)
        request = self._request("get_latent_representation", inputs, indices, batch_size, kwargs=kwargs)
        job = jobs.LatentJob(give_mean=give_mean, mc_samples=mc_samples, return_dist=return_dist)
        specs = None
        if write_to is not None:
            n_latent = self.module.n_latent
            specs = {"latent": OutputSpec("obsm", write_to, "dense", n_latent)}
            if return_dist:
                specs["variance"] = OutputSpec("obsm", f"{write_to}_var", "dense", n_latent)
        record = {"method": "get_latent_representation", "give_mean": give_mean, "mc_samples": mc_samples,
                  "return_dist": return_dist}
        result = self._deliver(inputs, job, request, specs, record, "latent")
        return (result["latent"], result["variance"]) if return_dist else result["latent"]

    def write_latent_representation(self, key: str = "X_scvi", **kwargs):
        """get_latent_representation(write_to=key, ...) of every cell: obsm/<key> (and obsm/<key>_var)."""
        return self.get_latent_representation(write_to=key, **kwargs)

    def get_latent_library_size(self, adata=None, indices=None, give_mean: bool = True,
                                batch_size: int | None = None, dataloader=None, *, write_to: str | None = None,
                                **kwargs):
        """The library size l_n per cell, (n_cells, 1): the mean of q(l | x) (give_mean) or exp of the observed or
        sampled log library. write_to: obsm/<key>."""
        compat.refuse("get_latent_library_size", dataloader=dataloader)
        if give_mean and self.module.use_observed_lib_size:
            raise RuntimeError(
                "The module for this model does not compute the posterior distribution for the library size. Set "
                "`give_mean` to False to use the observed library size instead."
            )
        inputs = self._inputs(adata)
        request = self._request("get_latent_library_size", inputs, indices, batch_size, kwargs=kwargs)
        specs = None if write_to is None else {"library": OutputSpec("obsm", write_to, "dense", 1)}
        return self._deliver(inputs, jobs.LibraryJob(give_mean=give_mean), request, specs,
                             {"method": "get_latent_library_size", "give_mean": give_mean}, "library size")["library"]

    def get_aggregated_posterior(self, adata=None, indices=None, batch_size: int | None = None,
                                 dof: float | None = 3.0) -> torch.distributions.Distribution:
        """The aggregated posterior of the cells: an equal-weight mixture of their q(z | x) (Student's t
        components with `dof` degrees of freedom, or Normal for dof=None), as scvi-tools builds it."""
        loc, variance = self.get_latent_representation(adata, indices, batch_size=batch_size, return_dist=True)
        loc = torch.as_tensor(loc, device=self.device)
        scale = torch.as_tensor(variance, device=self.device).sqrt()
        components = (torch.distributions.Normal(loc, scale) if dof is None
                      else torch.distributions.StudentT(dof, loc, scale))
        return torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=torch.ones(loc.shape[0], device=self.device)),
            torch.distributions.Independent(components, 1),
        )

    def differential_abundance(self, adata=None, adata_sub=None, sample_key: str | None = None,
                               batch_size: int = 128, num_cells_posterior: int | None = None,
                               dof: float | None = None, dataloader=None, seed: int = 0) -> pd.DataFrame:
        """Log density of every cell of adata_sub (default adata) under each sample's aggregated posterior (of at
        most num_cells_posterior cells of the sample, picked at random with `seed`): a DataFrame cells x samples,
        as scvi-tools, also stored in adata_sub.obsm["da_log_probs"] when adata_sub is an AnnData."""
        compat.refuse("differential_abundance", dataloader=dataloader)
        if sample_key is None:
            raise ValueError("differential_abundance needs sample_key, the obs column of the samples")
        full = self._source(adata)
        sub = full if adata_sub is None else self._source(adata_sub)
        latent_sub = torch.as_tensor(self.get_latent_representation(adata_sub if adata_sub is not None else adata,
                                                                    batch_size=batch_size), device=self.device)
        samples = full.obs_column(sample_key)
        sub_samples = sub.obs_column(sample_key)
        rng = np.random.default_rng(seed)
        names = list(pd.unique(sub_samples))
        log_probs = np.empty((sub.n_obs, len(names)), dtype=np.float32)
        for column, name in enumerate(names):
            rows = np.flatnonzero((samples == name).to_numpy())
            if num_cells_posterior is not None and num_cells_posterior < len(rows):
                rows = np.sort(rng.choice(rows, num_cells_posterior, replace=False))
            posterior = self.get_aggregated_posterior(adata, rows, batch_size=batch_size, dof=dof)
            with torch.no_grad():
                log_probs[:, column] = torch.cat([posterior.log_prob(block) for block in
                                                  latent_sub.split(batch_size)]).cpu().numpy()
        frame = pd.DataFrame(log_probs, index=sub.obs_names, columns=names)
        if isinstance(sub, AnnDataSource):
            sub.adata.obsm["da_log_probs"] = frame
        return frame

    # --- expression ----------------------------------------------------------------------------------------------

    def get_normalized_expression(
        self,
        adata=None,
        indices=None,
        transform_batch=None,
        gene_list=None,
        library_size: float | str = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: str | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        dataloader=None,
        data_loader_kwargs: dict | None = None,
        *,
        write_to: str | None = None,
        dtype: str = "float32",
        **kwargs,
    ):
        """The decoded expression rho_n: px_scale scaled to library_size (library_size="latent": px_rate).

        transform_batch: None (each cell's own batch), a batch category, or a list of them (the expression is
        averaged over the batches, one posterior draw per batch, as scvi-tools does). Returns, as scvi-tools: a
        DataFrame (cells x genes) unless return_numpy, or an (n_samples, n_cells, n_genes) array for n_samples > 1
        without return_mean; with n_samples_overall, (n_samples_overall, n_genes) draws over the cells of
        `indices`: picked uniformly (weights None or "uniform"), or by importance weight (weights="importance";
        importance_weighting_kwargs max_cells, truncation, n_mc_samples, n_mc_samples_per_pass in kwargs).
        write_to: layers/<key>, dense (n_obs x n_vars, one value per cell); with gene_list, obsm/<key> (n_obs x
        the listed genes, their names in the entry's attributes), for an atlas whose full layer would not fit the
        disk (10M cells x 2,000 genes is 80 GB of float32). dtype: "float32" (default) or "float16", for written
        and returned values (half the bytes; 3 significant digits).
        """
        compat.refuse("get_normalized_expression", dataloader=dataloader)
        importance = ImportanceOptions(**{key: kwargs.pop(key) for key in IMPORTANCE_KEYS if key in kwargs})
        inputs = self._inputs(adata)
        request = self._request("get_normalized_expression", inputs, indices, batch_size, silent,
                                {**(data_loader_kwargs or {}), **kwargs})
        transform = arguments.batch_codes(self.registry.batch_categories, transform_batch)
        genes = arguments.gene_positions(self.var_names, gene_list)
        if not (library_size == "latent" or (isinstance(library_size, (int, float)) and library_size > 0)):
            raise ValueError(f"library_size={library_size!r}: expected a positive number or 'latent'")
        if weights not in (None, "uniform", "importance"):
            raise ValueError(f"weights={weights!r}: expected None, 'uniform' or 'importance'")
        if n_samples_overall is not None:
            if write_to is not None:
                raise writer.OutputError("n_samples_overall draws are not per cell, so they cannot be written")
            return self._samples_overall(inputs, request, n_samples_overall, transform, genes, library_size,
                                         weights, importance)
        if weights == "importance":
            raise ValueError("weights='importance' weighs draws pooled over cells: pass n_samples_overall")
        job = jobs.ExpressionJob(transform_batches=transform, genes=genes, library_size=library_size,
                                 n_samples=n_samples, return_mean=return_mean)
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'float16'")
        if write_to is not None:
            if n_samples > 1 and not return_mean:
                raise writer.OutputError("a layer holds one value per cell and gene: use return_mean=True to write")
            group, n_columns = ("layers", self.store.n_vars) if genes is None else ("obsm", len(genes))
            specs = {"expression": OutputSpec(group, write_to, "dense", n_columns, dtype)}
            record = {"method": "get_normalized_expression", "transform_batch": [None if b == jobs.OWN_BATCH else b
                      for b in transform], "library_size": library_size, "n_samples": n_samples,
                      "genes": None if genes is None else list(self.var_names[list(genes)])}
            return self._deliver(inputs, job, request, specs, record, "normalized expression")["expression"]
        expression = run(inputs, job, request, description="normalized expression")["expression"].astype(dtype,
                                                                                                        copy=False)
        if n_samples > 1 and not return_mean:
            return np.moveaxis(expression, 1, 0)
        if return_numpy:
            return expression
        source = inputs.store
        names = source.obs_names if request.indices is None else source.obs_names[request.indices]
        columns = self.var_names if genes is None else self.var_names[list(genes)]
        return pd.DataFrame(expression, index=names, columns=columns)

    def _samples_overall(self, inputs, request, n_samples_overall, transform, genes, library_size, weights,
                         importance) -> np.ndarray:
        """(n_samples_overall, G') draws over the request's cells, averaged over the transform batches: cells
        picked uniformly with replacement (scvi-tools draws n_samples_overall // n_cells + 1 per cell and keeps
        n_samples_overall of them at random: the same distribution), or by importance weight."""
        rows = np.arange(inputs.store.n_obs) if request.indices is None else request.indices
        rng = np.random.default_rng(request.seed)
        if weights == "importance":
            if len(transform) > 1:
                raise NotImplementedError("Importance weights cannot be computed when expression levels are "
                                          "averaged across batches.")
            picked, numbers = importance_sample(inputs, request, rows, n_samples_overall, transform[0], importance,
                                                rng, 0)
            return posterior_scales(inputs, request, picked, np.full(len(picked), transform[0]), genes=genes,
                                    library_size=library_size, numbers=numbers)
        picked = rng.choice(rows, size=n_samples_overall, replace=True)
        scales = posterior_scales(inputs, request, np.tile(picked, len(transform)),
                                  np.repeat(transform, len(picked)), genes=genes, library_size=library_size)
        return scales.reshape(len(transform), n_samples_overall, -1).mean(0)

    def get_likelihood_parameters(self, adata=None, indices=None, n_samples: int = 1, give_mean: bool = False,
                                  batch_size: int | None = None, dataloader=None, *, write_to: str | None = None,
                                  **kwargs) -> dict:
        """The likelihood's parameters per cell and gene: {"mean": px_rate, "dispersions": theta (NB, ZINB),
        "dropout": sigmoid(zi_logits) (ZINB)}, (n_cells, n_genes) each, or (n_samples, n_cells, n_genes) for
        n_samples > 1 without give_mean. write_to: layers/<key>_mean, <key>_dispersions, <key>_dropout."""
        compat.refuse("get_likelihood_parameters", dataloader=dataloader)
        inputs = self._inputs(adata)
        request = self._request("get_likelihood_parameters", inputs, indices, batch_size, kwargs=kwargs)
        job = jobs.LikelihoodJob(n_samples=n_samples, give_mean=give_mean)
        names = ["mean"]
        if self.module.gene_likelihood != "poisson":
            names.append("dispersions")
        if self.module.gene_likelihood == "zinb":
            names.append("dropout")
        specs = None
        if write_to is not None:
            if n_samples > 1 and not give_mean:
                raise writer.OutputError("a layer holds one value per cell and gene: use give_mean=True to write")
            specs = {name: OutputSpec("layers", f"{write_to}_{name}", "dense", self.store.n_vars) for name in names}
        record = {"method": "get_likelihood_parameters", "n_samples": n_samples, "give_mean": give_mean}
        values = self._deliver(inputs, job, request, specs, record, "likelihood parameters")
        if write_to is None and n_samples > 1 and not give_mean:
            values = {name: np.moveaxis(value, 1, 0) for name, value in values.items()}
        return values

    def posterior_predictive_sample(self, adata=None, indices=None, transform_batch=None, n_samples: int = 1,
                                    gene_list=None, batch_size: int | None = None, dataloader=None,
                                    silent: bool = True, *, write_to: str | None = None, **kwargs):
        """Counts drawn from the posterior predictive p(x_hat | x): a draw of q(z, l | x), then of the fitted
        NB / ZINB / Poisson. Returns, as scvi-tools, a sparse.GCXS of shape (n_cells, n_genes) for n_samples=1,
        else (n_cells, n_genes, n_samples). write_to: layers/<key> (n_samples=1) or layers/<key>_0 ...
        <key>_{n_samples-1}, CSR (the lazy arrays are returned)."""
        compat.refuse("posterior_predictive_sample", dataloader=dataloader)
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples={n_samples!r}: the draws per cell, at least 1")
        inputs = self._inputs(adata)
        request = self._request("posterior_predictive_sample", inputs, indices, batch_size, silent, kwargs)
        transform = arguments.batch_codes(self.registry.batch_categories, transform_batch)
        genes = arguments.gene_positions(self.var_names, gene_list)
        if self.module.gene_likelihood == "normal":
            raise NotImplementedError("posterior predictive samples are drawn for count likelihoods (zinb, nb, "
                                      "poisson); this model's is 'normal'")
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
        values = self._deliver(inputs, job, request, specs, record, "posterior predictive")
        if write_to is not None and not isinstance(inputs.store, AnnDataSource):
            return values[names[0]] if n_samples == 1 else [values[name] for name in names]
        return _as_gcxs([values[name] for name in names])

    def get_feature_correlation_matrix(self, adata=None, indices=None, n_samples: int = 10, batch_size: int = 64,
                                       rna_size_factor: int = 1000, transform_batch=None,
                                       correlation_type: str = "spearman", silent: bool = True,
                                       seed: int = 0) -> pd.DataFrame:
        """Gene-gene correlation (genes x genes DataFrame) of scvi-tools' denoised samples (jobs.DenoisedJob): per
        batch of transform_batch (None: each cell's own), n_samples draws per cell, correlated over cells and
        draws ("spearman" or "pearson"), averaged over the batches. Holds the draws in memory: subset cells with
        indices on a large store."""
        from scipy.stats import spearmanr

        if correlation_type not in ("spearman", "pearson"):
            raise ValueError("Unknown correlation type. Choose one of 'spearman', 'pearson'.")
        inputs = self._inputs(adata)
        request = self._request("get_feature_correlation_matrix", inputs, indices, batch_size, silent,
                                {"seed": seed})
        matrices = []
        for batch in arguments.batch_codes(self.registry.batch_categories, transform_batch):
            job = jobs.DenoisedJob(n_samples=n_samples, rna_size_factor=rna_size_factor, transform_batch=batch)
            denoised = run(inputs, job, request, description="denoised samples")["denoised"]  # (n, S, G)
            flattened = np.transpose(denoised, (1, 0, 2)).reshape(-1, denoised.shape[-1])  # draw after draw
            matrices.append(np.corrcoef(flattened, rowvar=False) if correlation_type == "pearson"
                            else spearmanr(flattened)[0])
        return pd.DataFrame(np.mean(matrices, axis=0), index=self.var_names, columns=self.var_names)

    # --- differential expression ---------------------------------------------------------------------------------

    def differential_expression(
        self,
        adata=None,
        groupby: str | None = None,
        group1=None,
        group2=None,
        idx1=None,
        idx2=None,
        mode: str = "vanilla",
        delta: float = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1=None,
        batchid2=None,
        fdr_target: float = 0.05,
        silent: bool = False,
        weights: str | None = "uniform",
        filter_outlier_cells: bool = False,
        importance_weighting_kwargs: dict | None = None,
        dataloader=None,
        *,
        write_to: str | None = None,
        table_path=None,
        **kwargs,
    ) -> pd.DataFrame:
        """scVI's Bayesian differential expression (vanilla: Lopez et al. 2018; change: Boyeau et al. 2019), as
        scvi-tools' differential_expression with its get_bayes_factors options in kwargs (n_samples_overall,
        use_permutation, m_permutation, pseudocounts, test_mode, ...), its columns and row order (see
        outputs/differential.py for how the cells are gathered, in bounded memory). groupby may name an obs column
        added after set-up. Results are one DataFrame (index: gene names, one block of rows per comparison);
        write_to also writes it as uns/<key> of the store (or the AnnData), table_path as a file of exactly that
        path (.csv, or .parquet with pyarrow; refused before the work when it exists, unless overwrite).
        Extra: threshold_counts, max_sample_bytes.
        """
        compat.refuse("differential_expression", dataloader=dataloader)
        de_keys = {"n_samples_overall", "use_permutation", "m_permutation", "pseudocounts", "threshold_counts",
                   "test_mode", "max_sample_bytes"}
        de_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in de_keys}
        compat.explain_ignored("differential_expression", [k for k in ("change_fn", "m1_domain_fn", "cred_interval_lvls")
                                                           if kwargs.pop(k, None) is not None],
                               "the change and domain functions are scvi-tools' defaults (log fold change, |lfc| >= delta)")
        de_options = differential.DEOptions(
            mode=mode, delta=delta, all_stats=all_stats, batch_correction=batch_correction, batchid1=batchid1,
            batchid2=batchid2, fdr_target=fdr_target, weights=weights or "uniform",
            filter_outlier_cells=filter_outlier_cells, importance=ImportanceOptions(**(importance_weighting_kwargs or {})),
            **de_kwargs,
        )
        inputs = self._inputs(adata)
        request = self._request("differential_expression", inputs, None, batch_size, silent, kwargs)
        in_anndata = isinstance(inputs.store, AnnDataSource)
        targets = []
        if write_to is not None and not in_anndata:
            targets = [writer.output_store(path, request.output_store) for path in sources.data_paths(inputs.store)]
            for target in targets:
                writer.check_uns_key(target, write_to, request.overwrite)  # before the work, not after
        if table_path is not None:
            writer.check_table_path(table_path, request.overwrite)
        comparisons = differential.compare_groups(inputs.store, groupby, group1, group2, idx1, idx2)
        result = differential.differential_expression(
            inputs, request, comparisons, de_options, list(self.registry.batch_categories), self.var_names
        )
        for target in targets:  # a collection's table goes into each of its stores
            writer.write_uns(target, write_to, result, overwrite=request.overwrite)
        if write_to is not None and in_anndata:
            inputs.store.adata.uns[write_to] = result
        if table_path is not None:
            writer.write_table(result, table_path, overwrite=request.overwrite)
        return result

    # --- report --------------------------------------------------------------------------------------------------

    def report(self, out_dir, adata=None, labels_key: str | None = None, max_cells: int = 200_000,
               seed: int | None = None, overwrite: bool = False) -> dict:
        """The integration report (scvi_scale.report, extra `scvi-scale[report]`): training history, run
        measurements, a UMAP and scIB metrics of the latent against an uncorrected PCA baseline on a seeded
        subsample of at most max_cells cells (so it stays bounded on an atlas), and the outputs written into the
        store. Writes out_dir/report.html (self-contained), its PNGs and report.json; returns the JSON.
        labels_key: the obs column of cell labels (default the registered one); without, label-free metrics.
        overwrite: replace a report already in out_dir (else FileExistsError, before the work)."""
        from scvi_scale.report import build_report, check_report_dir, log_normalize, require_extra, subsample_rows

        require_extra()  # before the work
        check_report_dir(out_dir, overwrite)
        source = self._source(adata)
        seed = settings.seed if seed is None else seed
        labels_key = labels_key or self.registry.labels_key
        rows = subsample_rows(source.n_obs, max_cells, seed)
        counts = _rows_of(source, rows)
        obs = pd.DataFrame({"library_size": np.asarray(counts.sum(axis=1)).ravel()})
        for key in {self.registry.batch_key, labels_key} - {None}:
            obs[key] = source.obs_column(key).to_numpy()[rows]
        outputs = [] if isinstance(source, AnnDataSource) else [
            output for path in sources.data_paths(source) for output in writer.describe_outputs(path)]
        return build_report(
            out_dir, latent=self.get_latent_representation(adata, indices=rows, seed=seed), obs=obs,
            batch_key=self.registry.batch_key, labels_key=labels_key, history=self.history_,
            run={**self.run_info, "cells_in_data": source.n_obs},
            outputs=outputs, counts_for_baseline=log_normalize(counts), max_cells=len(rows), seed=seed,
            overwrite=overwrite,
        )

    # --- minified models -----------------------------------------------------------------------------------------

    def minify_adata(self, minified_data_type: str = MINIFIED_TYPE, use_latent_qzm_key: str = "X_latent_qzm",
                     use_latent_qzv_key: str = "X_latent_qzv") -> None:
        """Keep q(z | x) (its mean and variance, in obsm) and the observed library size (obs["observed_lib_size"])
        of every cell, so the outputs read no counts: scvi-tools' minified model. The data itself is not changed
        beyond those entries (a store gets them as outputs; its X stays, so raw-count statistics still work).
        Training, get_elbo and the like need the counts and are refused on a minified model."""
        if minified_data_type != MINIFIED_TYPE:
            raise NotImplementedError(f"minified_data_type={minified_data_type!r}: only {MINIFIED_TYPE!r}")
        if not self.module.use_observed_lib_size:
            raise NotImplementedError("minifying needs an observed library (use_observed_lib_size=True), as in "
                                      "scvi-tools")
        inputs = self._inputs()
        n_latent = self.module.n_latent
        specs = {"latent": OutputSpec("obsm", use_latent_qzm_key, "dense", n_latent),
                 "variance": OutputSpec("obsm", use_latent_qzv_key, "dense", n_latent)}
        record = {"method": "minify_adata", "give_mean": True, "return_dist": True}
        request = OutputRequest.of_call(overwrite=True)
        self._deliver(inputs, jobs.LatentJob(return_dist=True), request, specs, record, "latent posterior")
        bounds = self.store.block_bounds()
        library = np.concatenate([np.asarray(self.store.read_raw(start, stop).sum(axis=1), dtype=np.float32).ravel()
                                  for start, stop in zip(bounds[:-1], bounds[1:])])
        if isinstance(self.store, AnnDataSource):
            self.store.adata.obs[OBSERVED_LIBRARY_KEY] = library
            self.store.adata.uns["_scvi_adata_minify_type"] = minified_data_type
        else:
            offsets = getattr(self.store, "offsets", [0, self.store.n_obs])
            for path, first, last in zip(sources.data_paths(self.store), offsets[:-1], offsets[1:]):
                writer.write_obs_column(path, OBSERVED_LIBRARY_KEY, pd.Series(library[first:last]), overwrite=True)
        self.minified_data_type = minified_data_type
        self._minified_keys = (use_latent_qzm_key, use_latent_qzv_key)
        self._obs_arrays = None

    def _cached_posterior(self, source: CountStore) -> dict[str, np.ndarray]:
        """The minified per-cell arrays of `source`: qzm, qzv (n, L) and observed_lib_size (n,)."""
        qzm_key, qzv_key = self._minified_keys
        if isinstance(source, AnnDataSource):
            qzm, qzv = source.adata.obsm[qzm_key], source.adata.obsm[qzv_key]
        else:
            paths = sources.data_paths(source)
            qzm = np.concatenate([np.asarray(writer.read_output(path, f"obsm/{qzm_key}")) for path in paths])
            qzv = np.concatenate([np.asarray(writer.read_output(path, f"obsm/{qzv_key}")) for path in paths])
        library = source.obs_column(OBSERVED_LIBRARY_KEY).to_numpy()
        return {"qzm": np.asarray(qzm, dtype=np.float32), "qzv": np.asarray(qzv, dtype=np.float32),
                "observed_lib_size": np.asarray(library, dtype=np.float32)}

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
            data_path=None if isinstance(self.store, AnnDataSource) else _data_path(self.store),
            run=self.run_info,
            minified=None if self.minified_data_type is None else (self.minified_data_type, *self._minified_keys),
        )

    def save(self, dir_path, prefix: str | None = None, overwrite: bool = False, save_anndata: bool = False,
             save_kwargs: dict | None = None, legacy_mudata_format: bool = False, datamodule=None,
             format: str = "scvi-scale", **anndata_write_kwargs) -> None:
        """Write `dir_path/{prefix}model.pt`: weights, init parameters, registry, var names, history (and the
        store's path, so load can reopen it); format="scvi-tools" writes what scvi-tools' SCVI.load reads.
        save_anndata writes the AnnData beside it as {prefix}adata.h5ad, as scvi-tools; a model over a store
        records the store's path instead of copying its counts."""
        compat.refuse("save", datamodule=datamodule)
        compat.explain_ignored("save", [k for k, v in (("save_kwargs", save_kwargs), ("legacy_mudata_format",
                                                                                       legacy_mudata_format)) if v],
                               "model.pt is written with torch.save; there is no MuData here")
        persist.write_model(dir_path, self._saved(), module=self.module, overwrite=overwrite, format=format,
                            prefix=prefix)
        if save_anndata:
            if isinstance(self.store, AnnDataSource):
                self.store.adata.write_h5ad(persist.anndata_path(dir_path, prefix), **anndata_write_kwargs)
            else:
                compat.explain_ignored("save", ["save_anndata"], f"the counts stay in the store {self.store.path}, "
                                                                 "whose path the model directory records")

    @classmethod
    def load(cls, dir_path, adata=None, accelerator: str = "auto", device: int | str = "auto",
             prefix: str | None = None, backup_url: str | None = None, datamodule=None,
             allowed_classes_names_list: list[str] | None = None) -> SCVI:
        """Load a model that `save` (or scvi-tools' SCVI.save) wrote, over `adata`: an AnnData (no set-up needed:
        it is checked against the saved one, and set up in place), a store path or CountStore. adata=None takes
        the AnnData saved beside the model (save_anndata=True) or the store the model was saved from."""
        compat.refuse("load", datamodule=datamodule)
        compat.explain_ignored("load", [k for k, v in (("backup_url", backup_url),
                                                       ("allowed_classes_names_list", allowed_classes_names_list))
                                        if v is not None], "files are read from dir_path only")
        saved = persist.read_model(dir_path, prefix=prefix)
        if adata is None:
            adata = persist.saved_data(dir_path, prefix, saved)
        return cls._from_saved(saved, adata, _resolve_device(accelerator, device))

    @classmethod
    def _from_saved(cls, saved: persist.SavedModel, adata, device: torch.device) -> SCVI:
        """The one way a saved model becomes an SCVI over `adata`."""
        registry = saved.registry
        source = sources.source_for_model(adata, registry)
        if registry.library_log_means is None:  # a scvi-tools model with an observed library does not save them
            statistics = library_log_stats(source, registry.encode(source)["batch"], registry.n_batch, validate=False)
            registry.library_log_means, registry.library_log_vars = statistics
        if sources.is_anndata(adata):
            sources.remember_anndata_setup(adata, registry)
        model = cls(adata, registry=registry, **saved.init_params)
        model.module = saved.build_module().to(device)
        model.history_ = saved.history
        model.is_trained = saved.is_trained
        model.train_indices, model.validation_indices = saved.train_indices, saved.validation_indices
        model.run_info = saved.run
        if saved.minified is not None:
            model.minified_data_type, *keys = saved.minified
            model._minified_keys = tuple(keys)
        return model

    # --- query mapping (scArches) --------------------------------------------------------------------------------

    @staticmethod
    def prepare_query_anndata(adata, reference_model, return_reference_var_names: bool = False,
                              inplace: bool = True):
        """scvi-tools' prepare_query_anndata: the query AnnData given exactly the reference's genes, in the
        reference's order (reference_model: a model or a model directory, ours or scvi-tools').

        Reference genes the query lacks become zero columns in X and in every layer (NaN in var's columns), the
        query's own genes are dropped, obs / obsm / obsp / uns / raw are kept. inplace=True (scvi-tools' default, as
        its scArches tutorial calls it) changes `adata` itself and returns None; inplace=False returns a new
        AnnData and leaves `adata` as it was (scvi-tools returns `adata` itself, reordered in place, when no gene
        is missing). return_reference_var_names=True returns the reference's var names (a pd.Index) and touches
        nothing. Padding keeps each matrix's format and dtype (scvi-tools' makes them CSR float64) and keeps uns
        and raw (scvi-tools' drops them). Raises ValueError when the query shares no gene with the reference;
        warns, as scvi-tools does, under 80% of the reference's genes, naming how many are padded. A store gets
        the same alignment without a rewrite: prepare_query_zarr.
        """
        var_names = pd.Index(_reference(reference_model).var_names)
        if return_reference_var_names:
            return var_names
        return pad_and_sort(adata, var_names, inplace)

    @classmethod
    def prepare_query_zarr(cls, query_path, reference, layer: str | None = None) -> AlignedStore:
        """The query store aligned to the reference's genes (reference: a model or a model directory).

        Like prepare_query_anndata, without rewriting anything: missing genes read as zeros (with a warning saying
        how many), extra genes are dropped, the order is the reference's. layer: default the reference's."""
        saved = _reference(reference)
        return AlignedStore(query_path, saved.var_names, layer=saved.registry.layer if layer is None else layer)

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
        """A model over the query (an AnnData with the reference's genes, see prepare_query_anndata; or a store,
        aligned on the fly) holding the reference's weights, its batch encoding extended, ready to train.

        reference_model: a model or a directory written by SCVI.save (ours or scvi-tools'). The freeze options are
        scvi-tools' (see surgery.py); unfrozen=True trains everything; freeze_classifier (SCANVI) and
        transfer_batch (SYSVI) do not apply to SCVI. inplace_subset_query_vars subsets an AnnData query with
        extra genes to the reference's, in place. The query's obs must have the reference's batch column; labels
        are not needed (except by dispersion "gene-label").
        """
        compat.refuse("load_query_data", datamodule=datamodule, registry=registry)
        if reference_model is None:
            raise ValueError("Please provide a reference model as string or loaded model.")
        saved = _reference(reference_model)
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
        model.module.to(_resolve_device(accelerator, device)).eval()
        return model

    def __repr__(self) -> str:
        params = ", ".join(f"{k}: {v!r}" for k, v in self.init_params.items())
        status = "trained" if self.is_trained else "not trained"
        return f"SCVI model with the following parameters:\n{params}\nData: {self.store!r}\nTraining status: {status}"


def _training_config(max_epochs: int, early_stopping: bool, plan: dict, trainer: dict):
    """(TrainingConfig, progress bar on, max_steps) from scvi-tools' plan and trainer arguments; what has no
    meaning here is explained, anything else unknown is a TypeError."""
    names = {field.name for field in dataclasses.fields(TrainingConfig)} - {"max_epochs", "early_stopping"}
    known_plan = compat.split_known(plan, names, "train(plan_kwargs)", compat.PLAN_ARGUMENTS,
                                    "scvi-scale's loop is plain PyTorch (no compile or custom optimizer creator)")
    trainer_names = names | {"enable_progress_bar", "max_steps"}
    known_trainer = compat.split_known(trainer, trainer_names, "train", compat.LIGHTNING_TRAINER_ARGUMENTS,
                                       IGNORED_TRAINER)
    progress_bar = known_trainer.pop("enable_progress_bar", True)
    max_steps = known_trainer.pop("max_steps", None)
    if max_steps is not None and max_steps < 0:  # Lightning's "no limit"
        max_steps = None
    return TrainingConfig(max_epochs=max_epochs, early_stopping=early_stopping, **known_plan, **known_trainer), \
        progress_bar, max_steps


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """Progress bars off for one call when not `enabled` (train(enable_progress_bar=False))."""
    saved = settings.progress_bar
    settings.progress_bar = saved and enabled
    try:
        yield
    finally:
        settings.progress_bar = saved


def _as_gcxs(samples: list):
    """Posterior predictive draws (CSR (n, G) each) as scvi-tools returns them: a sparse.GCXS (n, G) for one draw,
    (n, G, S) for several."""
    import sparse

    if len(samples) == 1:
        return sparse.GCXS.from_scipy_sparse(samples[0])
    stacked = sparse.stack([sparse.COO.from_scipy_sparse(draw) for draw in samples], axis=-1)
    return sparse.GCXS(stacked)


def _data_path(store) -> str | list[str]:
    """What the model directory records of its store, to reopen it: its path, or a collection's paths."""
    return [remote.resolved(path) for path in sources.data_paths(store)] if isinstance(store, StoreCollection) \
        else remote.resolved(store.path)


def _rows_of(source: CountStore, rows: np.ndarray):
    """CSR counts (len(rows), G) of the sorted `rows`, reading only the blocks that hold them."""
    import scipy.sparse as sp

    bounds = source.block_bounds()
    parts = []
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        inside = rows[(rows >= start) & (rows < stop)]
        if len(inside):
            parts.append(source.read_csr(start, stop)[inside - start])
    return sp.vstack(parts, format="csr")


def _reference(reference) -> persist.SavedModel:
    """A reference for query mapping: a model directory (read) or a model (its saved form)."""
    if isinstance(reference, (str, os.PathLike)):
        return persist.read_model(reference)
    return reference._saved()


def _resolve_device(accelerator: str, device: int | str = "auto") -> torch.device:
    """scvi-tools' accelerator ("auto", "cpu", "gpu"/"cuda") and device ("auto" or an index) as a torch device."""
    index = None if device in ("auto", None) else int(device)
    if accelerator in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda" if index is None else f"cuda:{index}")
        if accelerator != "auto":
            raise RuntimeError(f"accelerator={accelerator!r} but torch sees no CUDA device")
        return torch.device("cpu")
    return torch.device(accelerator)
