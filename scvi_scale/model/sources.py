"""Where a model's cells come from, and where set-ups are kept until a model is built over them.

Two kinds of data, read the same way (the CountStore interface):
- a Zarr store (a path or a CountStore), set up with SCVI.setup_zarr: streamed, never loaded whole; or several
  stores (a list of paths, or a data.StoreCollection) read as one, genes joined as anndata.concat does;
- an AnnData, in memory or backed, set up in place with SCVI.setup_anndata, as scvi-tools does: the registry
  is kept under a uuid written into adata.uns["_scvi_uuid"], the counts are read from the AnnData itself
  (data.AnnDataSource: nothing copied, nothing written to disk), and obs is read live, so columns added later
  are seen. A model saved and loaded again is reattached with SCVI.load(dir, adata).

The set-ups wait here, as scvi-tools keeps its managers in a class-level map: by uuid for AnnDatas, by resolved
path and layer for stores. A model takes its registry from here once and holds it itself.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pandas as pd

from scvi_scale.data import CountStore, Registry, StoreCollection, StoreError, remote
from scvi_scale.data.aligned import AlignedStore
from scvi_scale.data.anndata_source import AnnDataSource
from scvi_scale.module import VAE, to_tensors

SETUP_UUID_KEY = "_scvi_uuid"  # scvi-tools' uns key for the set-up of an AnnData
CHECKED_CELLS = 1 << 20  # cells whose obs codes are range-checked at once (int64 while checked: 8 MB a field)

_anndata_setups: dict[str, Registry] = {}
_store_setups: dict[tuple[str, str | None], Registry] = {}


def is_anndata(data) -> bool:
    return hasattr(data, "obs") and hasattr(data, "var") and hasattr(data, "uns") and not isinstance(data, CountStore)


def is_collection(data) -> bool:
    return isinstance(data, StoreCollection) or isinstance(data, (list, tuple))


def remember_store_setup(store, registry: Registry) -> None:
    _store_setups[_store_key(_data_key(store), store.layer)] = registry


def remember_anndata_setup(adata, registry: Registry) -> None:
    adata.uns[SETUP_UUID_KEY] = uuid.uuid4().hex
    _anndata_setups[adata.uns[SETUP_UUID_KEY]] = registry


def setup_of(data) -> Registry:
    """The registry setup_anndata / setup_zarr made for `data`, or StoreError saying which set-up to run."""
    if is_anndata(data):
        registry = _anndata_setups.get(data.uns.get(SETUP_UUID_KEY))
        if registry is None:
            raise StoreError("this AnnData has not been set up: call SCVI.setup_anndata(adata, batch_key=...) first")
        return registry
    path = _data_key(data)
    registry = _store_setups.get(_store_key(path, getattr(data, "layer", None)))
    if registry is None:
        registry = next((r for (p, _), r in _store_setups.items() if p == _resolved(path)), None)
    if registry is None:
        raise StoreError(f"{path} has not been set up: call SCVI.setup_zarr({path!r}, batch_key=..., ...) first")
    return registry


def open_source(data, layer: str | None, collection: dict | None = None):
    """A reader over `data`: an AnnData (AnnDataSource), a store path, a list of store paths (a StoreCollection,
    joined as `collection`, a Registry's record of one, says), or a CountStore / StoreCollection as it is."""
    if isinstance(data, (CountStore, StoreCollection)):
        return data
    if is_anndata(data):
        return AnnDataSource(data, layer=layer)
    if isinstance(data, (list, tuple)):
        record = collection or {}
        join = record.get("join", "inner")
        stores = record.get("stores", [])
        return StoreCollection(
            list(data),
            join="inner" if join == "given" else join,
            layer=layer,
            label=record.get("label"),
            keys=[store["key"] for store in stores] if len(stores) == len(data) else None,
        )
    return CountStore(data, layer=layer)


def source_for_model(data, registry: Registry) -> CountStore:
    """`data` opened with the registry's layer and checked to have the registered genes in order."""
    source = open_source(data, registry.layer, registry.collection)
    registry.check_var_names(source)
    return source


def query_source(data, reference_var_names: list[str], layer: str | None) -> CountStore:
    """A query for mapping: an AnnData must already hold the reference's genes in order (prepare_query_anndata,
    as in scvi-tools); a store is aligned on the fly (AlignedStore) when its genes differ."""
    if is_anndata(data):
        source = AnnDataSource(data, layer=layer)
        reference = _index(reference_var_names)
        if not source.var_names.equals(reference):
            n_shared = len(source.var_names.intersection(reference))
            raise StoreError(
                f"the query AnnData's genes are not the reference's, in the reference's order (it has "
                f"{source.n_vars} genes, {n_shared} of the reference's {len(reference)}): call "
                "SCVI.prepare_query_anndata(adata, reference) first, in place (it pads missing genes with zeros, "
                "drops the query's own and reorders), or map the AnnData it returns with inplace=False"
            )
        return source
    if isinstance(data, AlignedStore):
        return data
    path = data.path if isinstance(data, CountStore) else os.fspath(data)
    store = data if isinstance(data, CountStore) else CountStore(path, layer=layer)
    if store.var_names.equals(_index(reference_var_names)):
        return store
    return AlignedStore(path, reference_var_names, layer=store.layer)


def checked_obs_arrays(source: CountStore, registry: Registry, module: VAE) -> dict[str, np.ndarray]:
    """`registry.encode(source)`, each cell's codes checked against `module`'s categories (the data boundary: the
    module's per-step path reads no values back)."""
    encoded = registry.encode(source)
    for first in range(0, source.n_obs, CHECKED_CELLS):  # in parts: the check widens the codes to int64
        module.check_inputs(to_tensors(encoded, "cpu", slice(first, first + CHECKED_CELLS)))
    return encoded


def check_library_prior(registry: Registry) -> None:
    """The log-normal prior of a latent library (use_observed_lib_size=False) needs each batch's log library sizes
    to vary: ValueError naming the batches whose do not."""
    assert registry.library_log_vars is not None, "the registry computes the library prior at set-up"
    flat = [c for c, v in zip(registry.batch_categories, registry.library_log_vars, strict=True) if not v > 0]
    if flat:
        raise ValueError(
            f"use_observed_lib_size=False puts a log-normal prior on each batch's library sizes, but batches "
            f"{flat} of {registry.batch_key!r} have log library sizes of variance 0 (one cell, or equal "
            "library sizes): keep the observed library (the default), or merge those batches"
        )


def cell_positions(indices, n_obs: int) -> np.ndarray | None:
    """Integer cell positions from scvi-tools' `indices`: None (all cells), positions, or a boolean mask."""
    if indices is None:
        return None
    indices = np.asarray(indices)
    if indices.dtype == bool:
        if indices.shape != (n_obs,):
            raise ValueError(f"indices is a boolean mask of shape {indices.shape}; the data has {n_obs} cells")
        return np.flatnonzero(indices)
    return indices


def data_paths(source) -> list[str]:
    """The store folders `source` reads: one, or each store of a collection."""
    return list(source.paths) if isinstance(source, StoreCollection) else [source.path]


def setup_store(
    path, layer: str | None, join: str, store_key: str | None, storage_options: dict | None, **fields
) -> Registry:
    """SCVI.setup_zarr's work: `path` opened (one store, or a list of stores or a StoreCollection read as one;
    URLs reached with `storage_options`, kept in memory for them), its `fields` (Registry.build's keys) registered in
    one streaming pass, the set-up kept for SCVI(path)."""
    if isinstance(path, (list, tuple)):
        for url in path:
            remote.remember_options(os.fspath(url), storage_options)
    if is_collection(path):
        keys = None if isinstance(path, StoreCollection) else [_stem(p) for p in path]
        store: CountStore | StoreCollection = (
            path
            if isinstance(path, StoreCollection)
            else StoreCollection(list(path), join=join, layer=layer, label=store_key, keys=keys)
        )
    else:
        store = CountStore(path, layer=layer, storage_options=storage_options)
    registry = Registry.build(store, **fields)  # type: ignore[arg-type]  # a StoreCollection reads as a CountStore
    if isinstance(store, StoreCollection):
        registry.collection = store.describe()
    remember_store_setup(store, registry)
    return registry


def describe_setup(source, registry: Registry, hide_state_registries: bool) -> str:
    """view_anndata_setup's lines: the data, the registered fields and, unless hide_state_registries, their
    categories."""
    lines = [f"Set-up of {source!r}", f"  layer: {registry.layer or 'X'}; {registry.n_vars} genes"]
    fields = [
        ("batch", registry.batch_key, registry.batch_categories),
        ("labels", registry.labels_key, registry.label_categories),
    ]
    fields += [
        ("categorical covariate", key, registry.categorical_covariate_categories[key])
        for key in registry.categorical_covariate_keys
    ]
    for role, key, categories in fields:
        shown = "" if hide_state_registries else f": {list(categories)[:20]}"
        lines.append(f"  {role} {key!r}: {len(categories)} categories{shown}" if key else f"  {role}: none")
    for key in registry.continuous_covariate_keys:
        lines.append(f"  continuous covariate {key!r}")
    if registry.size_factor_key:
        lines.append(f"  size factor {registry.size_factor_key!r}")
    return "\n".join(lines)


def _stem(path) -> str:
    """A store's name without its folder and suffix ("atlas/part1.zarr" -> "part1"), a collection's store key."""
    return os.path.splitext(os.path.basename(os.fspath(path).rstrip("/")))[0]


def _index(names):
    return pd.Index([str(name) for name in names])


def _data_key(data) -> str:
    """One string naming a store or a collection of stores (their resolved paths, joined)."""
    if isinstance(data, StoreCollection):
        return " + ".join(_resolved(path) for path in data.paths)
    if isinstance(data, (list, tuple)):
        return " + ".join(_resolved(os.fspath(path)) for path in data)
    return os.fspath(data)


def _resolved(path) -> str:
    return remote.resolved(path)


def _store_key(path, layer) -> tuple[str, str | None]:
    return (path if " + " in path else _resolved(path), layer)
