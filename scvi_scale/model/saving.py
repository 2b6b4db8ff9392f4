"""SCVI.save and SCVI.load (bound in SCVI's class body), and an `SCVI` as persist.SavedModel and back: what SCVI.save
writes (`saved_form`) and the one way a saved model becomes an SCVI over some data again (`from_saved`), for SCVI.load
and query mapping. The files themselves are persist.py's.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import torch

from scvi_scale import persist
from scvi_scale.data import StoreCollection, remote
from scvi_scale.data.anndata_source import AnnDataSource
from scvi_scale.data.registry import library_log_stats
from scvi_scale.model import compat, docs, sources, training

ModelT = TypeVar("ModelT")  # SCVI; unbound, as a bound would import scvi.py, which imports this module


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
            folder, saved_form(self), module=self.module, overwrite=overwrite, format=format, prefix=prefix
        )
    if save_anndata and not isinstance(self.store, AnnDataSource):
        compat.explain_ignored(
            "save",
            ["save_anndata"],
            f"the counts stay in the store {self.store.path}, whose path the model directory records",
        )


@docs.fill
def load(
    cls: type[ModelT],
    dir_path,
    adata=None,
    accelerator: str = "auto",
    device: int | str = "auto",
    prefix: str | None = None,
    backup_url: str | None = None,
    datamodule=None,
    allowed_classes_names_list: list[str] | None = None,
) -> ModelT:
    """A model that `save` (or scvi-tools' SCVI.save) wrote.

    Parameters
    ----------
    dir_path, prefix
        The model's folder (or its s3://, gs:// or https:// URL) and file-name prefix.
    adata
        An AnnData (checked against the saved set-up, and set up in place), a store path or CountStore; None: the
        AnnData saved beside the model, or the store it was saved from.
    {accelerator}
    {device}
    backup_url, allowed_classes_names_list
        Ignored with a warning (files are read from dir_path only).
    {datamodule}

    Returns
    -------
    SCVI
    """
    compat.refuse("load", datamodule=datamodule)
    given = (("backup_url", backup_url), ("allowed_classes_names_list", allowed_classes_names_list))
    compat.explain_ignored("load", [k for k, v in given if v is not None], "files are read from dir_path only")
    saved = persist.read_model(dir_path, prefix=prefix)
    if adata is None:
        adata = persist.saved_data(dir_path, prefix, saved)
    return from_saved(cls, saved, adata, training.resolve_device(accelerator, device))


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
    model = cls.__new__(cls)  # the saved weights, not a random module built and replaced
    model._hold(registry, source, dict(saved.init_params), saved.build_module().to(device))
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
