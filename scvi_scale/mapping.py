"""Reference mapping (scArches, Lotfollahi et al. 2022) and k-NN label transfer, as scvi-tools' ArchesMixin.

    >>> query = SCVI.prepare_query_zarr("query.zarr", "reference_model/")    # genes aligned on the fly
    >>> model = SCVI.load_query_data(query, "reference_model/")             # new batches, reference frozen
    >>> model.train(max_epochs=100)
    >>> transfer_labels(reference, model, k=15)                             # obs columns in query.zarr

Gene alignment. A query store is never rewritten: `AlignedStore` reads it by row blocks like any CountStore and
maps each block's columns onto the reference genes as it is read (reference genes the query lacks read as zeros,
query genes the reference lacks are dropped), so a query larger than memory maps too.

Surgery. `load_query_data` extends the batch categories with the query's new ones (Registry.extend_batches), builds
a module with the wider batch one-hot and copies the reference weights into it; the columns of the new batches
keep their fresh initialisation. Freezing follows scvi-tools' `_set_params_online_update` (same options, same
defaults): the fully connected blocks' linear maps are the only weights that learn (plus the library encoder,
and the batch norms unless frozen), and within them only the columns of the new batches, unless
freeze_expression=False (the encoder's first layer learns whole) or freeze_decoder_first_layer=False (the
decoder's). Two deliberate differences from scvi-tools, so that frozen reference weights stay bit-identical:
- scvi-tools lets every covariate column of a hooked layer learn (reference batches and other covariates too);
  here only the new batches' columns do. Query cells of a reference batch leave that batch's weights as they are.
  With dispersion "gene-batch" the new batches' columns of px_r learn too (scvi-tools freezes px_r whole).
- Adam's weight decay adds decay * w to every gradient inside optimizer.step(), after the gradient hooks that
  zero the frozen entries, so in scvi-tools a query run with weight_decay > 0 (its default 1e-6) moves frozen
  weights slightly. Here a global optimizer step hook copies the frozen entries of partly frozen weights back
  after every step (`_restore_frozen_entries`); fully frozen weights have requires_grad=False and are never
  given to the optimizer.
Frozen batch norms get momentum 0, so their running statistics do not move (num_batches_tracked still counts).
The freezing lives on the module object: a query model saved and loaded again trains whole; call
load_query_data on it (as the reference) to fine-tune with freezing again.

Label transfer. The reference's labels go to query cells by the k nearest reference cells in the latent space
(Euclidean, exact, computed in blocks), weighted as scArches' `weighted_knn_transfer` does: with d the k distances
and s their standard deviation, weight = exp(-d / (2 / s)^2), normalised to sum 1; the prediction is the label of
largest total weight p and the uncertainty is 1 - p. Both are written as obs columns of the query store.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import zarr
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from scvi_scale.data.registry import Registry
from scvi_scale.data.store import CountStore, StoreError
from scvi_scale.data.writer import write_elem
from scvi_scale.nn import FCLayers
from scvi_scale.outputs.writer import reconsolidate

logger = logging.getLogger("scvi_scale.mapping")

MODEL_FILE = "model.pt"
MIN_SHARED_GENE_FRACTION = 0.8  # below this share of the reference genes scvi-tools warns of poor mapping
KNN_QUERY_BLOCK = 1024  # query cells per distance block
KNN_REFERENCE_BLOCK = 65_536  # reference cells per distance block: a block of distances is 256 MB of float32
ENCODER_MODULES = ("z_encoder", "l_encoder")
# scvi-tools leaves the library encoder out of the freezing: it learns whole, with no hooks.
UNFROZEN_MODULES = ("l_encoder",)


# --- gene alignment ------------------------------------------------------------------------------------------


class AlignedStore(CountStore):
    """A query store read with the reference's genes, in the reference's order; the store itself is not changed.

    n_vars, shape and var_names are the reference's; every block read (read_raw, read_csr, read_dense, to_dask)
    has its columns mapped: reference gene j reads query column `query_columns[j]`, or zeros where that is -1.
    query_var_names holds the store's own genes. Pickles as (path, layer, reference genes).
    """

    def __init__(self, path, reference_var_names, layer: str | None = None):
        self._reference_var_names = None  # the store's own genes until the alignment below is set
        super().__init__(path, layer=layer)
        self.query_var_names = CountStore.var_names.func(self)
        reference = pd.Index([str(name) for name in reference_var_names])
        if reference.has_duplicates:
            duplicated = list(reference[reference.duplicated()][:5])
            raise StoreError(f"the reference has duplicated var names, e.g. {duplicated}")
        self.query_columns = self.query_var_names.get_indexer(reference).astype(np.int64)
        n_shared = int(np.count_nonzero(self.query_columns >= 0))
        if n_shared == 0:
            raise StoreError(
                f"{self.path}: none of its {len(self.query_var_names)} genes is among the reference's "
                f"{len(reference)} genes (e.g. {list(reference[:3])}); are they named the same way?"
            )
        n_missing = len(reference) - n_shared
        n_dropped = len(self.query_var_names) - n_shared
        if n_missing:
            fraction = n_shared / len(reference)
            poor = " (less than 80%: the mapping may be poor)" if fraction < MIN_SHARED_GENE_FRACTION else ""
            warnings.warn(
                f"{self.path}: {n_missing} of the reference's {len(reference)} genes are missing from the query "
                f"and read as zeros; the query has {fraction:.0%} of the reference genes{poor}",
                UserWarning,
                stacklevel=2,
            )
        if n_dropped:
            logger.info("%s: %d query genes not in the reference are dropped", self.path, n_dropped)
        # query column -> reference column (-1: dropped), for remapping CSR column indices
        self.reference_columns = np.full(len(self.query_var_names), -1, dtype=np.int64)
        present = np.flatnonzero(self.query_columns >= 0)
        self.reference_columns[self.query_columns[present]] = present
        self._reference_var_names = reference
        self.n_vars = len(reference)
        self.shape = (self.n_obs, self.n_vars)

    @property
    def var_names(self) -> pd.Index:
        if self._reference_var_names is None:
            return CountStore.var_names.func(self)
        return self._reference_var_names

    @property
    def is_identity(self) -> bool:
        """True when the query has exactly the reference genes in the reference order (blocks pass unchanged)."""
        return len(self.query_var_names) == self.n_vars and bool(
            np.array_equal(self.query_columns, np.arange(self.n_vars))
        )

    def __getstate__(self):
        return {"path": self.path, "layer": self.layer, "reference_var_names": list(self._reference_var_names)}

    def __setstate__(self, state):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # warned once already, in the process that aligned it
            self.__init__(state["path"], state["reference_var_names"], layer=state["layer"])

    def __repr__(self) -> str:
        return f"Aligned{super().__repr__()[:-1]}, aligned to {self.n_vars} reference genes)"

    def var_frame(self) -> pd.DataFrame:
        return super().var_frame().reindex(self._reference_var_names)

    def read_raw(self, start: int, stop: int):
        """Rows [start, stop) with the reference's columns, in the stored dtype (CSR or dense as stored)."""
        block = super().read_raw(start, stop)
        if self.is_identity:
            return block
        if isinstance(block, np.ndarray):
            aligned = np.zeros((block.shape[0], self.n_vars), dtype=block.dtype)
            present = np.flatnonzero(self.query_columns >= 0)
            aligned[:, present] = block[:, self.query_columns[present]]
            return aligned
        columns = self.reference_columns[block.indices]
        kept = columns >= 0
        kept_before = np.concatenate([[0], np.cumsum(kept)])
        aligned = sp.csr_matrix(
            (block.data[kept], columns[kept].astype(block.indices.dtype), kept_before[block.indptr]),
            shape=(block.shape[0], self.n_vars),
        )
        aligned.sort_indices()  # the reorder scrambles each row's column order; CSR consumers want it sorted
        return aligned


def _reference_payload(reference) -> dict:
    """model.pt of a reference given as a model directory written by SCVI.save, or as a model object."""
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference) / MODEL_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: the reference must be a model directory (SCVI.save)")
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if "scvi_scale_version" not in payload.get("attr_dict", {}):
            raise ValueError(
                f"{path} was not written by scvi-scale; load a scvi-tools model with "
                "scvi_scale.interop.load_scvi_tools(dir_path, reference_store) and pass the model"
            )
        return payload
    return {
        "model_state_dict": reference.module.state_dict(),
        "var_names": list(reference.var_names),
        "attr_dict": {"init_params_": reference.init_params, "registry_": reference.registry.to_dict()},
    }


def _widened(reference: torch.Tensor, fresh: torch.Tensor, insert_at: int) -> torch.Tensor:
    """`reference` with the extra columns of `fresh` inserted at column `insert_at` (scvi-tools appends at the end,
    which is the same unless further categorical covariates follow the batch one-hot)."""
    n_extra = fresh.shape[1] - reference.shape[1]
    return torch.cat([reference[:, :insert_at], fresh[:, insert_at : insert_at + n_extra], reference[:, insert_at:]], 1)


def _batch_column_start(fc: FCLayers, linear: nn.Linear, n_batch: int) -> int | None:
    """First column of the batch one-hot among `linear`'s inputs (one of fc's injected maps), or None when fc
    takes no batch. The one-hot covariates follow the layer's own inputs, batch first (module.VAE's cat_list)."""
    if not fc.n_cat_list or fc.n_cat_list[0] != n_batch or n_batch <= 1:
        return None
    return linear.in_features - sum(n for n in fc.n_cat_list if n > 1)


def _injected_linears(fc: FCLayers):
    """(block index, Linear) of fc's blocks that take the covariates."""
    return [(index, block[0]) for index, block in enumerate(fc.fc_layers) if fc._injects_into(index)]


def transfer_reference_weights(module: nn.Module, reference_state: dict, n_reference_batch: int) -> None:
    """Load the reference's weights into `module`, built for more batches, keeping the new columns' fresh values.

    Linear maps that take the batch one-hot get new columns after the reference batches' ones; the "gene-batch"
    dispersion px_r (genes, n_batch) new columns at the end; the library prior buffers come from the module
    (built from the extended registry, whose reference entries equal the reference's)."""
    fresh = module.state_dict()
    state = {}
    for name, fc in module.named_modules():
        if not isinstance(fc, FCLayers):
            continue
        for index, linear in _injected_linears(fc):
            key = f"{name}.fc_layers.Layer {index}.0.weight"
            if key not in reference_state or reference_state[key].shape == fresh[key].shape:
                continue
            first = _batch_column_start(fc, linear, module.n_batch)
            if first is None:
                raise ValueError(f"{key}: the reference's shape {tuple(reference_state[key].shape)} cannot be widened")
            old_width = n_reference_batch if n_reference_batch > 1 else 0
            state[key] = _widened(reference_state[key], fresh[key], first + old_width)
    for key, value in reference_state.items():
        if key in state:
            continue
        if key not in fresh:
            raise ValueError(f"the reference has a weight {key!r} that the query module does not")
        if key in ("library_log_means", "library_log_vars"):
            state[key] = fresh[key]
        elif value.shape == fresh[key].shape:
            state[key] = value
        elif key == "px_r" and value.dim() == 2:
            state[key] = _widened(value, fresh[key], value.shape[1])
        else:
            raise ValueError(f"{key}: reference shape {tuple(value.shape)} vs query {tuple(fresh[key].shape)}")
    module.load_state_dict(state)


# --- freezing ------------------------------------------------------------------------------------------------

_FROZEN_ATTR = "_scvi_scale_frozen_entries"  # on a partly frozen Parameter: (trainable mask, reference values)


def _restore_frozen_entries(optimizer, args, kwargs) -> None:
    """Optimizer step post hook: copy back the frozen entries of partly frozen parameters (see module docstring)."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                entry = getattr(parameter, _FROZEN_ATTR, None)
                if entry is not None:
                    trainable, reference = entry
                    if trainable.device != parameter.device:
                        trainable, reference = trainable.to(parameter.device), reference.to(parameter.device)
                        setattr(parameter, _FROZEN_ATTR, (trainable, reference))
                    parameter.copy_(torch.where(trainable, parameter, reference))


register_optimizer_step_post_hook(_restore_frozen_entries)


def _set_trainable(parameter: nn.Parameter, trainable: torch.Tensor) -> None:
    """Make `parameter` learn only where `trainable` (same shape, bool) is True."""
    if bool(trainable.all()):
        parameter.requires_grad_(True)
        return
    if not bool(trainable.any()):
        parameter.requires_grad_(False)
        return
    parameter.requires_grad_(True)
    mask = trainable.to(parameter.dtype)
    parameter.register_hook(lambda grad: grad * mask.to(grad.device))
    setattr(parameter, _FROZEN_ATTR, (trainable.clone(), parameter.detach().clone()))


def freeze_for_query(
    module: nn.Module,
    n_reference_batch: int,
    *,
    unfrozen: bool = False,
    freeze_dropout: bool = False,
    freeze_expression: bool = True,
    freeze_decoder_first_layer: bool = True,
    freeze_batchnorm_encoder: bool = True,
    freeze_batchnorm_decoder: bool = False,
) -> None:
    """Freeze a widened module for query training, with scvi-tools' options (see the module docstring)."""
    if unfrozen:
        return
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    if getattr(module, "dispersion", None) == "gene-batch" and hasattr(module, "px_r"):
        # scvi-tools freezes px_r whole, leaving the new batches' dispersions at their random initialisation
        trainable = torch.zeros_like(module.px_r, dtype=torch.bool)
        trainable[:, n_reference_batch:] = True
        _set_trainable(module.px_r, trainable)
    for name, child in module.named_modules():
        top = name.split(".")[0]
        if top in UNFROZEN_MODULES:
            for parameter in child.parameters(recurse=False):
                parameter.requires_grad_(True)
            continue
        in_encoder = top in ENCODER_MODULES
        if isinstance(child, nn.Dropout) and freeze_dropout:
            child.p = 0.0
        if isinstance(child, nn.BatchNorm1d):
            frozen = freeze_batchnorm_encoder if in_encoder else freeze_batchnorm_decoder
            if frozen:
                child.momentum = 0.0
            for parameter in child.parameters():
                parameter.requires_grad_(not frozen)
        if not isinstance(child, FCLayers):
            continue
        first_layer_learns = (in_encoder and not freeze_expression) or (
            top == "decoder" and not freeze_decoder_first_layer
        )
        for index, block in enumerate(child.fc_layers):
            linear = block[0]
            if index == 0 and first_layer_learns:
                linear.weight.requires_grad_(True)
                linear.bias.requires_grad_(True)
                continue
            trainable = torch.zeros_like(linear.weight, dtype=torch.bool)
            first = _batch_column_start(child, linear, module.n_batch) if child._injects_into(index) else None
            if first is not None:
                old_width = n_reference_batch if n_reference_batch > 1 else 0
                trainable[:, first + old_width : first + module.n_batch] = True
            _set_trainable(linear.weight, trainable)
            linear.bias.requires_grad_(False)


# --- the mixin -----------------------------------------------------------------------------------------------


class ArchesMixin:
    """scArches query mapping for SCVI: prepare_query_zarr and load_query_data, as scvi-tools' ArchesMixin."""

    @classmethod
    def prepare_query_zarr(cls, query_path, reference, layer: str | None = None) -> AlignedStore:
        """The query store aligned to the reference's genes (reference: a model or a model directory).

        Like scvi-tools' prepare_query_anndata, without rewriting anything: missing genes read as zeros (with a
        warning saying how many), extra genes are dropped, the order is the reference's. layer: default the
        reference registry's."""
        payload = _reference_payload(reference)
        if layer is None:
            layer = payload["attr_dict"]["registry_"]["layer"]
        return AlignedStore(query_path, payload["var_names"], layer=layer)

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
    ):
        """A model over `query_store` holding the reference's weights, its batch encoding extended, ready to train.

        query_store: a path or CountStore; one whose genes differ from the reference's is aligned first
        (prepare_query_zarr). reference: a model or a directory written by SCVI.save. The freeze options are
        scvi-tools' (see the module docstring); unfrozen=True trains everything; freeze_classifier applies to
        SCANVI only and is accepted for the same signature. The query's obs must have the reference's batch
        column; labels are not needed (except by dispersion "gene-label").
        """
        del freeze_classifier  # no classifier in SCVI
        payload = _reference_payload(reference)
        attrs = payload["attr_dict"]
        reference_registry = Registry.from_dict(attrs["registry_"])
        if reference_registry.batch_key is None:
            raise StoreError(
                "the reference was set up without a batch_key: scArches maps query batches through the batch "
                "covariate, so train the reference with one"
            )
        if not isinstance(query_store, CountStore):
            query_store = AlignedStore(query_store, payload["var_names"], layer=reference_registry.layer)
        elif not query_store.var_names.equals(pd.Index(payload["var_names"])):
            query_store = AlignedStore(query_store.path, payload["var_names"], layer=query_store.layer)
        init_params = dict(attrs["init_params_"])
        if init_params.get("dispersion") != "gene-label":
            # labels only feed the "gene-label" dispersion: the query need not have them (codes read as 0)
            reference_registry.labels_key = None
        registry = reference_registry.extend_batches(query_store)
        model = cls(query_store, registry=registry, **init_params)
        transfer_reference_weights(model.module, payload["model_state_dict"], reference_registry.n_batch)
        freeze_for_query(
            model.module,
            reference_registry.n_batch,
            unfrozen=unfrozen,
            freeze_dropout=freeze_dropout,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        )
        from scvi_scale.model import _resolve_device  # model.py builds SCVI on this mixin

        model.module.to(_resolve_device(accelerator)).eval()
        model.is_trained = False
        return model


# --- label transfer ------------------------------------------------------------------------------------------


def nearest_neighbours(reference: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest reference rows of every query row (Euclidean). reference (N, L), query (M, L).

    Returns distances (M, k) float32 ascending and indices (M, k) int64. Brute force in blocks of
    KNN_QUERY_BLOCK x KNN_REFERENCE_BLOCK distances: memory is bounded, time is O(M N L)."""
    if reference.ndim != 2 or query.ndim != 2 or reference.shape[1] != query.shape[1]:
        raise ValueError(f"reference {reference.shape} and query {query.shape} must be (cells, same latent dims)")
    if not 1 <= k <= len(reference):
        raise ValueError(f"k={k}: must be between 1 and the {len(reference)} reference cells")
    reference_t = torch.as_tensor(reference, dtype=torch.float32)
    distances = np.empty((len(query), k), dtype=np.float32)
    indices = np.empty((len(query), k), dtype=np.int64)
    for start in range(0, len(query), KNN_QUERY_BLOCK):
        block = torch.as_tensor(query[start : start + KNN_QUERY_BLOCK], dtype=torch.float32)
        best_d = torch.full((len(block), 0), float("inf"))
        best_i = torch.empty((len(block), 0), dtype=torch.int64)
        for first in range(0, len(reference_t), KNN_REFERENCE_BLOCK):
            d = torch.cdist(block, reference_t[first : first + KNN_REFERENCE_BLOCK])
            d_k, i_k = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
            merged_d = torch.cat([best_d, d_k], 1)
            merged_i = torch.cat([best_i, i_k + first], 1)
            order = torch.topk(merged_d, min(k, merged_d.shape[1]), dim=1, largest=False).indices
            best_d, best_i = merged_d.gather(1, order), merged_i.gather(1, order)
        distances[start : start + len(block)] = best_d.numpy()
        indices[start : start + len(block)] = best_i.numpy()
    return distances, indices


def weighted_votes(distances: np.ndarray, neighbour_codes: np.ndarray, n_labels: int) -> np.ndarray:
    """Per-cell label probabilities (M, n_labels) from the k neighbours' distances and label codes (M, k).

    scArches' kernel: with s the standard deviation of a cell's k distances, weight = exp(-d / (2 / s)^2),
    normalised over the k neighbours (equal weights when all k distances are equal)."""
    distances = distances.astype(np.float64)
    spread = distances.std(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        bandwidth = (2.0 / spread) ** 2
    weights = np.exp(-distances / bandwidth)
    weights /= weights.sum(axis=1, keepdims=True)
    probabilities = np.zeros((len(distances), n_labels))
    rows = np.repeat(np.arange(len(distances)), distances.shape[1])
    np.add.at(probabilities, (rows, neighbour_codes.ravel()), weights.ravel())
    return probabilities


def transfer_labels(
    reference_model,
    query_model,
    labels_key: str | None = None,
    k: int = 15,
    write_to=None,
    key_added: str | None = None,
    overwrite: bool = False,
    reference_latent: np.ndarray | None = None,
    query_latent: np.ndarray | None = None,
) -> pd.DataFrame:
    """Predict the query cells' `labels_key` from the reference cells' by weighted k-NN on the latent.

    labels_key: an obs column of the reference store (default: the reference registry's labels_key).
    write_to: the query store to write obs columns `key_added` (categorical, the reference's categories) and
        `key_added + "_uncertainty"` (float32, 1 - the winning label's weight) into; default the query model's
        store; False writes nothing. key_added: default "predicted_" + labels_key.
    reference_latent / query_latent: latents already computed (default: get_latent_representation()).
    Returns a DataFrame (query cells) with the two columns.
    """
    labels_key = labels_key or reference_model.registry.labels_key
    if labels_key is None:
        raise ValueError("no labels_key given and the reference registered none: which obs column to transfer?")
    key_added = key_added or f"predicted_{labels_key}"
    labels = reference_model.store.obs_column(labels_key)
    categorical = labels.astype("category") if not isinstance(labels.dtype, pd.CategoricalDtype) else labels
    known = categorical.notna().to_numpy()
    if not known.any():
        raise ValueError(f"{reference_model.store.path}: obs column {labels_key!r} has no labels to transfer")
    if reference_latent is None:
        reference_latent = reference_model.get_latent_representation()
    if query_latent is None:
        query_latent = query_model.get_latent_representation()
    reference_codes = categorical.cat.codes.to_numpy()[known]
    distances, neighbours = nearest_neighbours(np.asarray(reference_latent)[known], np.asarray(query_latent), k)
    categories = categorical.cat.categories
    probabilities = weighted_votes(distances, reference_codes[neighbours], len(categories))
    winner = probabilities.argmax(axis=1)
    result = pd.DataFrame(
        {
            key_added: pd.Categorical.from_codes(winner, categories=categories),
            f"{key_added}_uncertainty": np.clip(1.0 - probabilities.max(axis=1), 0.0, 1.0).astype(np.float32),
        },
        index=query_model.store.obs_names,
    )
    if write_to is not False:
        target = query_model.store.path if write_to is None else str(write_to)
        for column in result.columns:
            write_obs_column(target, column, result[column], overwrite=overwrite)
    return result


def write_obs_column(store, key: str, values: pd.Series, overwrite: bool = False) -> None:
    """Add (or with overwrite=True replace) obs/<key> of a local AnnData-Zarr store, in anndata's encoding.

    X and the other columns are never touched. The column is encoded into a hidden sibling name first and renamed
    into place, and only then listed in obs' column-order and in the consolidated metadata, so a crash at any
    point leaves a store that anndata reads (with or without the new column).
    """
    store = os.fspath(store)
    root = zarr.open_group(store, mode="r+", use_consolidated=False)
    obs = root["obs"]
    folder = Path(store) / "obs"
    if not folder.is_dir():
        raise StoreError(f"{store}: obs columns can only be written into a store on the local file system")
    index_name = obs.attrs.get("_index", "_index")
    order = list(obs.attrs.get("column-order", []))
    n_obs = obs[index_name].shape[0]
    if key == index_name or "/" in key or key.startswith("."):
        raise ValueError(f"obs column name {key!r} is not allowed (the index, or a path)")
    if len(values) != n_obs:
        raise ValueError(f"obs/{key}: {len(values)} values for the store's {n_obs} cells")
    if key in obs and not overwrite:
        raise FileExistsError(f"{store}: obs/{key} exists; pass overwrite=True to replace it")
    token = uuid.uuid4().hex[:12]
    partial = f".{key}.partial-{token}"
    write_elem(obs, partial, values.to_numpy() if not isinstance(values.dtype, pd.CategoricalDtype) else values.array)
    if key in obs:
        replaced = folder / f".{key}.replaced-{token}"
        os.replace(folder / key, replaced)
        os.replace(folder / partial, folder / key)
        shutil.rmtree(replaced)
    else:
        os.replace(folder / partial, folder / key)
    if key not in order:
        obs.attrs["column-order"] = order + [key]
    reconsolidate(store)


# --- command line --------------------------------------------------------------------------------------------


def add_map_command(subparsers) -> None:
    """`scvi-scale map QUERY_STORE --reference MODEL_DIR --out MODEL_DIR`: map, fine-tune, save, transfer labels."""
    p = subparsers.add_parser("map", help="map a query store onto a trained reference (scArches) and save the model")
    p.add_argument("query", help="AnnData-Zarr store of the query cells (genes are aligned to the reference's)")
    p.add_argument("--reference", required=True, help="reference model directory (scvi-scale train)")
    p.add_argument("--out", required=True, help="directory for the query model")
    p.add_argument("--reference-store", help="the reference's store: needed for --labels-key")
    p.add_argument("--labels-key", help="reference obs column to transfer to the query by k-NN on the latent")
    p.add_argument("--k", type=int, default=15, help="neighbours for label transfer")
    p.add_argument("--max-epochs", type=int, help="fine-tuning epochs (default: scvi-tools' heuristic)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="as scvi-tools' tutorials use for queries")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unfrozen", action="store_true", help="train every weight")
    for option, default in (
        ("freeze-dropout", False),
        ("freeze-expression", True),
        ("freeze-decoder-first-layer", True),
        ("freeze-batchnorm-encoder", True),
        ("freeze-batchnorm-decoder", False),
    ):
        p.add_argument(f"--{option}", action=argparse.BooleanOptionalAction, default=default)
    p.add_argument("--latent-key", default="X_scVI", help="obsm key for the query latent")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model, latent or prediction")
    p.set_defaults(run=_run_map)


def _run_map(args) -> int:
    from scvi_scale import SCVI
    from scvi_scale.outputs import write_obsm

    out = Path(args.out)
    if (out / MODEL_FILE).exists() and not args.overwrite:
        raise SystemExit(f"{out / MODEL_FILE} exists: pass --overwrite to replace it or choose another --out")
    if args.labels_key and not args.reference_store:
        raise SystemExit("--labels-key needs --reference-store (the reference cells' latent and labels)")
    query_store = SCVI.prepare_query_zarr(args.query, args.reference)
    model = SCVI.load_query_data(
        query_store,
        args.reference,
        unfrozen=args.unfrozen,
        freeze_dropout=args.freeze_dropout,
        freeze_expression=args.freeze_expression,
        freeze_decoder_first_layer=args.freeze_decoder_first_layer,
        freeze_batchnorm_encoder=args.freeze_batchnorm_encoder,
        freeze_batchnorm_decoder=args.freeze_batchnorm_decoder,
    )
    model.train(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        batch_size=args.batch_size,
        plan_kwargs={"lr": args.lr, "weight_decay": args.weight_decay},
        checkpoint_dir=out,
        seed=args.seed,
    )
    model.save(out, overwrite=True)
    latent = model.get_latent_representation()
    write_obsm(args.query, args.latent_key, latent, overwrite=args.overwrite)
    print(f"query model saved to {out}; latent written to {args.query} obsm/{args.latent_key}")
    if args.labels_key:
        reference = SCVI.load(args.reference, args.reference_store)
        result = transfer_labels(
            reference, model, labels_key=args.labels_key, k=args.k, overwrite=args.overwrite, query_latent=latent
        )
        print(f"wrote obs columns {list(result.columns)} to {args.query}")
    return 0
