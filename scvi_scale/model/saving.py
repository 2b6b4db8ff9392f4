"""An `SCVI` as persist.SavedModel and back: what SCVI.save writes (`saved_form`) and the one way a saved model
becomes an SCVI over some data again (`from_saved`), for SCVI.load and query mapping. The files themselves are
persist.py's.
"""

from __future__ import annotations

import torch

from scvi_scale import persist
from scvi_scale.data import StoreCollection, remote
from scvi_scale.data.anndata_source import AnnDataSource
from scvi_scale.data.registry import library_log_stats
from scvi_scale.model import sources


def saved_form(model) -> persist.SavedModel:
    """What a model directory holds of `model` (an SCVI): weights, init parameters, registry, history, split, run
    measurements, minified keys, and the store's path (None for an AnnData)."""
    return persist.SavedModel(
        module_state=model.module.state_dict(),
        var_names=list(model.var_names),
        init_params=model.init_params,
        registry=model.registry,
        history=model.history_,
        is_trained=model.is_trained,
        train_indices=model.train_indices,
        validation_indices=model.validation_indices,
        data_path=None if isinstance(model.store, AnnDataSource) else data_path(model.store),
        run=model.run_info,
        minified=None if model.minified_data_type is None else (model.minified_data_type, *model._minified_keys),
    )


def from_saved(cls, saved: persist.SavedModel, adata, device: torch.device):
    """A `cls` (SCVI) over `adata` (an AnnData, set up in place with the saved registry, or a store) holding the
    saved model, on `device`."""
    registry = saved.registry
    source = sources.source_for_model(adata, registry)
    if registry.library_log_means is None:  # a scvi-tools model with an observed library does not save them
        statistics = library_log_stats(source, registry.encode(source)["batch"], registry.n_batch, validate=False)
        registry.library_log_means, registry.library_log_vars = statistics
    if sources.is_anndata(adata):
        sources.remember_anndata_setup(adata, registry)
    model = cls(adata, registry=registry, **saved.init_params)
    model.module = saved.build_module().to(device)
    model.history_, model.is_trained, model.run_info = saved.history, saved.is_trained, saved.run
    model.train_indices, model.validation_indices = saved.train_indices, saved.validation_indices
    if saved.minified is not None:
        model.minified_data_type, *keys = saved.minified
        model._minified_keys = tuple(keys)
    return model


def data_path(store) -> str | list[str]:
    """What the model directory records of its store, to reopen it: its path, or a collection's paths."""
    return (
        [remote.resolved(path) for path in sources.data_paths(store)]
        if isinstance(store, StoreCollection)
        else remote.resolved(store.path)
    )
