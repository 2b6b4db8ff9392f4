"""`SCVI`: the user-facing model over AnnData-Zarr stores, with scvi-tools' method names, arguments and defaults.

    >>> from scvi_scale import SCVI
    >>> SCVI.setup_zarr("atlas.zarr", batch_key="batch")
    >>> model = SCVI("atlas.zarr", n_latent=10)
    >>> model.train(max_epochs=20, checkpoint_dir="run/")     # streams the store; resume=True after a kill
    >>> latent = model.get_latent_representation()            # (n_obs, n_latent), computed in chunks
    >>> model.save("model_dir/"); model = SCVI.load("model_dir/", "atlas.zarr")

This is the one place that ties the store (`data`), the sampler and the torch module together: everything below
works on row blocks, so memory is bounded by the batch and buffer sizes, never by the number of cells.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scvi_scale import __version__, distributed
from scvi_scale.data import CountStore, Registry, StoreError, write_store
from scvi_scale.mapping import ArchesMixin
from scvi_scale.module import VAE
from scvi_scale.outputs import OutputsMixin
from scvi_scale.outputs.chunks import LatentJob
from scvi_scale.sampler import BlockShuffleSampler, SequentialSampler, train_validation_split
from scvi_scale.train import TrainingConfig, fit, max_epochs_heuristic, to_tensors

logger = logging.getLogger("scvi_scale.model")

MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_INFERENCE_BATCH_SIZE = 1024


class SCVI(ArchesMixin, OutputsMixin):
    """scVI (Lopez et al. 2018) on a Zarr store that `SCVI.setup_zarr` registered.

    Parameters are scvi-tools' `SCVI` ones, with its defaults; other keyword arguments go to the module (`VAE`):
    encode_covariates, deeply_inject_covariates, use_batch_norm, use_layer_norm, use_observed_lib_size.
    The chunked outputs (normalized expression, DE, posterior samples, likelihood parameters and their Zarr
    write-back) come from `scvi_scale.outputs.OutputsMixin`.
    """

    # store key -> Registry built by setup_zarr; scvi-tools keeps its managers in a class-level map the same way.
    _registries: dict[tuple[str, str | None], Registry] = {}
    # id(AnnData) -> the store setup_anndata wrote it to, and the temporary folders it made (removed at exit)
    _anndata_stores: dict[int, str] = {}
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
            if id(store) not in self._anndata_stores:
                raise StoreError("this AnnData has not been set up: call SCVI.setup_anndata(adata, batch_key=...) first")
            store = self._anndata_stores[id(store)]
        self.store = store if isinstance(store, CountStore) else None
        path = os.fspath(store)
        if registry is None:
            registry = self._registries.get(_registry_key(path, getattr(store, "layer", None)))
            if registry is None:
                raise StoreError(
                    f"{path} has not been set up: call SCVI.setup_zarr({path!r}, batch_key=..., ...) first"
                )
        self.registry = registry
        if self.store is None:
            self.store = CountStore(path, layer=registry.layer)
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
        self.module = VAE(
            n_input=self.store.n_vars,
            n_batch=registry.n_batch,
            n_labels=registry.n_labels,
            n_continuous_cov=registry.n_continuous_cov,
            n_cats_per_cov=registry.n_cats_per_cov or None,
            library_log_means=registry.library_log_means,
            library_log_vars=registry.library_log_vars,
            **self.init_params,
        )
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
        registered, so `SCVI(adata)` trains on it like on any store. The AnnData itself is not modified."""
        if store_path is None:
            folder = tempfile.TemporaryDirectory(prefix="scvi-scale-anndata-")
            cls._temporary_folders.append(folder)
            store_path = Path(folder.name) / "adata.zarr"
        write_store(adata, store_path, layer=layer)
        cls._anndata_stores[id(adata)] = str(store_path)
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
        """Per-cell encoded obs fields (batch, labels, covariates), aligned to store rows; read once."""
        if self._obs_arrays is None:
            encoded = self.registry.encode(self.store)
            # covariate matrices with no columns (none registered) are left out: the module expects none
            self._obs_arrays = {key: a for key, a in encoded.items() if a.ndim == 1 or a.shape[1] > 0}
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
        self.is_trained = state.epoch > 0 or state.global_step > 0
        self.module.eval()

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics as scvi-tools shows them: metric name -> DataFrame indexed by epoch."""
        return {
            key: pd.DataFrame({key: [v for _, v in pairs]}, index=pd.Index([e for e, _ in pairs], name="epoch"))
            for key, pairs in self.history_.items()
        }

    # --- streaming evaluation -----------------------------------------------------------------------------------

    def _sequential(self, indices=None, batch_size: int | None = None) -> SequentialSampler:
        rows = None if indices is None else np.asarray(indices, dtype=np.int64)
        return SequentialSampler(
            self.store, rows, batch_size=batch_size or DEFAULT_INFERENCE_BATCH_SIZE, obs_arrays=self.obs_arrays
        )

    @torch.no_grad()
    def _per_cell(self, compute, indices=None, batch_size=None) -> np.ndarray:
        """Stack `compute(tensors)` (a (B, ...) tensor) over the cells of `indices`, in store order per chunk."""
        self.module.eval()
        parts = [compute(to_tensors(mb, self.device)).cpu().numpy() for mb in self._sequential(indices, batch_size)]
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

    def get_latent_representation(
        self,
        indices=None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        seed: int = 0,
    ):
        """The posterior mean of z (n_cells, n_latent), cells in the order of `indices`, computed chunk by chunk
        (the job `write_latent_representation` writes to the store; see outputs/chunks.py LatentJob).

        give_mean=False draws one sample per cell; for latent_distribution="ln" the mean is estimated from
        `mc_samples` samples pushed through the softmax. return_dist=True gives (mean, variance) of q(z | x).
        Draws are keyed by `seed` and cell, so a cell gets the same values whatever else is computed with it.
        """
        job = LatentJob(give_mean=give_mean, mc_samples=mc_samples, return_dist=return_dist)
        result = self._in_memory(
            job, indices=indices, batch_size=batch_size, seed=seed, chunk_rows=None, client=None, model_dir=None,
            silent=True, description="latent",
        )
        return (result["latent"], result["variance"]) if return_dist else result["latent"]

    # --- persistence ---------------------------------------------------------------------------------------------

    def save(self, dir_path, overwrite: bool = False, format: str = "scvi-scale") -> None:
        """Write `dir_path/model.pt`: weights, init parameters, registry, var names and history (no counts).

        format="scvi-tools" writes the directory scvi-tools' `SCVI.load` reads instead (see interop.py).
        """
        if format == "scvi-tools":
            from scvi_scale.interop import save_scvi_tools

            return save_scvi_tools(self, dir_path, overwrite=overwrite)
        if format != "scvi-scale":
            raise ValueError(f"format={format!r}: expected 'scvi-scale' or 'scvi-tools'")
        dir_path = Path(dir_path)
        target = dir_path / MODEL_FILE
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        dir_path.mkdir(parents=True, exist_ok=True)
        payload = {
            "model_state_dict": self.module.state_dict(),
            "var_names": list(self.var_names),
            "attr_dict": {
                "init_params_": self.init_params,
                "registry_": self.registry.to_dict(),
                "history_": self.history_,
                "is_trained_": self.is_trained,
                "train_indices_": self.train_indices,
                "validation_indices_": self.validation_indices,
                "scvi_scale_version": __version__,
            },
        }
        tmp = dir_path / (MODEL_FILE + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, target)

    @classmethod
    def load(cls, dir_path, store, accelerator: str = "cpu") -> "SCVI":
        """Load a model that `save` (or scvi-tools' SCVI.save) wrote, over `store` (a path or CountStore) with the
        same genes in the same order."""
        payload = torch.load(Path(dir_path) / MODEL_FILE, map_location="cpu", weights_only=False)
        attrs = payload["attr_dict"]
        if "scvi_scale_version" not in attrs:  # a directory that scvi-tools' SCVI.save wrote
            from scvi_scale.interop import load_scvi_tools

            return load_scvi_tools(dir_path, store, accelerator=accelerator, model_class=cls)
        registry = Registry.from_dict(attrs["registry_"])
        if not isinstance(store, CountStore):
            store = CountStore(store, layer=registry.layer)
        registry.check_var_names(store)
        model = cls(store, registry=registry, **attrs["init_params_"])
        model.module.load_state_dict(payload["model_state_dict"])
        model.module.to(_resolve_device(accelerator)).eval()
        model.history_ = attrs["history_"]
        model.is_trained = attrs["is_trained_"]
        model.train_indices, model.validation_indices = attrs["train_indices_"], attrs["validation_indices_"]
        return model

    def __repr__(self) -> str:
        params = ", ".join(f"{k}: {v!r}" for k, v in self.init_params.items())
        status = "trained" if self.is_trained else "not trained"
        return (
            f"SCVI model with the following parameters:\n{params}\n"
            f"Store: {self.store!r}\nTraining status: {status}"
        )


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

