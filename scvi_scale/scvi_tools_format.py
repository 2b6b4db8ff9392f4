"""scvi-tools' model files (its `SCVI.save` / `SCVI.load` directory format) translated to ours and back.

    >>> fields = to_ours(payload, "model_dir/")        # SavedModel fields from scvi-tools' model.pt payload
    >>> payload = from_ours(saved, module, frames)    # the payload scvi.model.SCVI.load(dir, adata=...) reads

persist.py reads and writes the files; this module only translates what they hold.

scvi-tools writes `<dir>/model.pt` (torch.save of a dict):
    model_state_dict  the VAE's state dict, plus "pyro_param_store" (empty for SCVI)
    var_names         numpy array of the genes, in order
    attr_dict         the model's attributes: "init_params_" {"non_kwargs": SCVI's named arguments, "kwargs":
                      {"kwargs": the module keywords}}, "registry_" (setup_args, field_registries with each field's
                      state_registry: categorical_mapping of batch and labels, mappings of the extra categorical
                      covariates, columns of the continuous ones), "history_" (DataFrames), "is_trained_",
                      train/validation/test indices, ...
Weights map one to one (our names follow scvi-tools', see module.py) except `decoder.px_scale_decoder.0.*`, ours
`decoder.px_scale_decoder.*`. scvi-tools builds parts the options never use (l_encoder with an observed library,
px_r for Poisson or "gene-cell", the decoder's px_r head except for "gene-cell" and its dropout head except for
ZINB): they are dropped on loading and filled with freshly initialised (unused) values on saving.

Module options map as they are (log_variational, batch_representation "embedding" with batch_embedding_kwargs,
var_activation, extra_encoder_kwargs / extra_decoder_kwargs within what our networks take, gene_likelihood
"normal"). What cannot be mapped (to_ours raises UnsupportedScviToolsModel naming it): models other than SCVI;
set-ups other than setup_anndata (MuData, data modules); size_factor_key (scvi-tools then swaps px_scale's softmax
for a softplus, ours stays a softmax); minified scvi-tools models; any module keyword this module does not know.
Only the weights, set-up, training history flag and split indices are carried over (no optimizer state).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from scvi_scale.data.registry import NO_KEY_CATEGORIES, Registry
from scvi_scale.nn import Encoder

if TYPE_CHECKING:
    from scvi_scale.module import VAE

SCVI_TOOLS_VERSION = "1.4.2"  # the scvi-tools version whose format this writes (and the fixture was made with)
# SCVI's named arguments, as scvi-tools keeps them in init_params_["non_kwargs"]
NAMED_ARGUMENTS = (
    "n_hidden",
    "n_latent",
    "n_layers",
    "dropout_rate",
    "dispersion",
    "gene_likelihood",
    "use_observed_lib_size",
    "latent_distribution",
)
# scvi-tools module keywords that our VAE takes as they are
MAPPED_KEYWORDS = (
    "encode_covariates",
    "deeply_inject_covariates",
    "use_batch_norm",
    "use_layer_norm",
    "log_variational",
    "batch_representation",
    "batch_embedding_kwargs",
    "var_activation",
    "extra_encoder_kwargs",
    "extra_decoder_kwargs",
)
# scvi-tools module keywords accepted at their default only: name -> the default
DEFAULT_ONLY_KEYWORDS = {
    "extra_payload_autotune": False,
    "use_size_factor_key": False,
}
SCALE_HEAD = "decoder.px_scale_decoder"


class UnsupportedScviToolsModel(ValueError):
    """A scvi-tools model uses an option that scvi-scale does not implement; the message names it."""


def _unsupported(path, what: str) -> UnsupportedScviToolsModel:
    return UnsupportedScviToolsModel(f"{path}: {what}; scvi-scale cannot map this scvi-tools option")


def _init_params(path, attrs: dict) -> dict:
    """Our SCVI keyword arguments from scvi-tools' init_params_, refusing what we cannot map."""
    stored = attrs["init_params_"]
    named = dict(stored.get("non_kwargs", {}))
    keywords = dict(stored.get("kwargs", {}).get("kwargs", {}))
    params = {key: named.pop(key) for key in NAMED_ARGUMENTS if key in named}
    if named:
        raise _unsupported(path, f"SCVI arguments {sorted(named)}")
    for key, value in keywords.items():
        if key in MAPPED_KEYWORDS:
            params[key] = value
        elif key in DEFAULT_ONLY_KEYWORDS:
            if value != DEFAULT_ONLY_KEYWORDS[key] and not (value == {} and DEFAULT_ONLY_KEYWORDS[key] is None):
                raise _unsupported(path, f"{key}={value!r}")
        else:
            raise _unsupported(path, f"module keyword {key}={value!r}")
    return params


def _registry(path, registry: dict, var_names: list[str], n_obs: int) -> Registry:
    """Our Registry from scvi-tools' registry_ (library statistics are filled in by the caller)."""
    if registry.get("model_name") != "SCVI":
        raise _unsupported(path, f"model {registry.get('model_name')!r} (only SCVI)")
    if registry.get("setup_method_name", "setup_anndata") != "setup_anndata":
        raise _unsupported(path, f"set-up by {registry['setup_method_name']}")
    setup = registry["setup_args"]
    if setup.get("size_factor_key"):
        raise _unsupported(path, f"size_factor_key={setup['size_factor_key']!r}")
    fields = registry["field_registries"]

    def categories(field: str, key) -> list:
        if key is None:
            return list(NO_KEY_CATEGORIES)
        return np.asarray(fields[field]["state_registry"]["categorical_mapping"]).tolist()

    categorical_keys = list(setup.get("categorical_covariate_keys") or [])
    mappings = fields.get("extra_categorical_covs", {}).get("state_registry", {}).get("mappings", {})
    return Registry(
        var_names=list(var_names),
        layer=setup.get("layer"),
        batch_key=setup.get("batch_key"),
        batch_categories=categories("batch", setup.get("batch_key")),
        labels_key=setup.get("labels_key"),
        label_categories=categories("labels", setup.get("labels_key")),
        categorical_covariate_keys=categorical_keys,
        categorical_covariate_categories={key: np.asarray(mappings[key]).tolist() for key in categorical_keys},
        continuous_covariate_keys=list(setup.get("continuous_covariate_keys") or []),
        n_obs=n_obs,
    )


def _unused_parts(params: dict) -> tuple[str, ...]:
    """Key prefixes of scvi-tools' state dict that our module does not build for these options."""
    likelihood = params.get("gene_likelihood", "zinb")
    dispersion = params.get("dispersion", "gene")
    unused = []
    if params.get("use_observed_lib_size", True):
        unused.append("l_encoder.")
    if likelihood == "poisson" or dispersion == "gene-cell":
        unused.append("px_r")
    if dispersion != "gene-cell" or likelihood == "poisson":
        unused.append("decoder.px_r_decoder.")
    if likelihood != "zinb":
        unused.append("decoder.px_dropout_decoder.")
    return tuple(unused)


def to_ours(payload: dict, dir_path) -> dict:
    """persist.SavedModel fields from scvi-tools' model.pt payload (read from `dir_path`, named in errors); the
    history stays in scvi-tools' frames (metric -> DataFrame).

    The registry's library statistics come from the state dict when the model has a latent library; with an
    observed library scvi-tools does not save them (they are None here: the loader computes them from a store)."""
    attrs = payload["attr_dict"]
    if attrs.get("minified_data_type_") or attrs["registry_"].get("minified_data_type"):
        raise _unsupported(dir_path, "a minified model")
    params = _init_params(dir_path, attrs)
    fields = attrs["registry_"]["field_registries"]
    n_cells = fields["X"]["summary_stats"]["n_cells"]
    registry = _registry(dir_path, attrs["registry_"], list(payload["var_names"]), n_cells)
    state = {key: value for key, value in payload["model_state_dict"].items() if key != "pyro_param_store"}
    if "library_log_means" in state:
        registry.library_log_means = state["library_log_means"].reshape(-1).numpy().astype(np.float32)
        registry.library_log_vars = state["library_log_vars"].reshape(-1).numpy().astype(np.float32)
    else:
        registry.library_log_means = registry.library_log_vars = None
    unused = _unused_parts(params)
    module_state = {
        key.replace(f"{SCALE_HEAD}.0.", f"{SCALE_HEAD}."): value
        for key, value in state.items()
        if not key.startswith(unused)
    }
    return {
        "module_state": module_state,
        "var_names": list(payload["var_names"]),
        "init_params": params,
        "registry": registry,
        "history": attrs.get("history_") or {},  # scvi-tools' frames: persist turns them into ours
        "is_trained": bool(attrs.get("is_trained_", True)),
        "train_indices": attrs.get("train_indices_"),
        "validation_indices": attrs.get("validation_indices_"),
        "source": f"scvi-tools {attrs['registry_'].get('scvi_version', '?')}",
    }


def _scvi_tools_state(module: VAE, params: dict) -> dict:
    """Our module's state dict in scvi-tools' names, with the parts scvi-tools always builds filled in."""
    state = {}
    for key, value in module.state_dict().items():
        state[key.replace(f"{SCALE_HEAD}.", f"{SCALE_HEAD}.0.")] = value.detach().cpu()
    n_input, n_hidden = module.n_input, params.get("n_hidden", 128)
    if "l_encoder." in _unused_parts(params):
        encoder_first = module.z_encoder.encoder.fc_layers[0]
        norms = {type(layer) for layer in encoder_first}  # type: ignore[attr-defined]  # a Sequential, typed Module
        library_encoder = Encoder(
            module.z_encoder.encoder.fc_layers[0][0].in_features  # type: ignore[index]
            - sum(n for n in module.z_encoder.encoder.n_cat_list if n > 1),
            1,
            n_cat_list=module.z_encoder.encoder.n_cat_list,
            n_hidden=n_hidden,
            dropout_rate=params.get("dropout_rate", 0.1),
            inject_covariates=module.z_encoder.encoder.inject_covariates,
            use_batch_norm=nn.BatchNorm1d in norms,
            use_layer_norm=nn.LayerNorm in norms,
        )
        state.update({f"l_encoder.{key}": value for key, value in library_encoder.state_dict().items()})
    if "px_r" not in state:  # scvi-tools builds it for every likelihood, except with "gene-cell"
        shapes = {"gene": (n_input,), "gene-batch": (n_input, module.n_batch), "gene-label": (n_input, module.n_labels)}
        shape = shapes.get(params.get("dispersion", "gene"))
        if shape is not None:
            state["px_r"] = torch.randn(shape)
    for head in ("px_r_decoder", "px_dropout_decoder"):
        if f"decoder.{head}.weight" not in state:
            linear = nn.Linear(n_hidden, n_input)
            state[f"decoder.{head}.weight"] = linear.weight.detach()
            state[f"decoder.{head}.bias"] = linear.bias.detach()
    state["pyro_param_store"] = {"params": {}, "constraints": {}}
    return state


def _scvi_tools_registry(registry: Registry) -> dict:
    """scvi-tools' registry_ for our registry (the layout scvi-tools 1.4's setup_anndata records)."""
    var_names = np.asarray(registry.var_names, dtype=object)
    categorical = registry.categorical_covariate_keys
    continuous = registry.continuous_covariate_keys

    def categorical_field(key, categories, attr_key, summary):
        # Without a key, scvi-tools puts one category, 0, in a column of its own (its load re-creates it).
        mapping = np.array([0]) if key is None else np.asarray(categories, dtype=object)
        return {
            "data_registry": {"attr_key": attr_key, "attr_name": "obs"},
            "state_registry": {"categorical_mapping": mapping, "original_key": attr_key if key is None else key},
            "summary_stats": {summary: len(mapping)},
        }

    fields = {
        "X": {
            "data_registry": {"attr_key": registry.layer, "attr_name": "X" if registry.layer is None else "layers"},
            "state_registry": {"n_obs": registry.n_obs, "n_vars": len(var_names), "column_names": var_names},
            "summary_stats": {"n_cells": registry.n_obs, "n_vars": len(var_names)},
        },
        "batch": categorical_field(registry.batch_key, registry.batch_categories, "_scvi_batch", "n_batch"),
        "labels": categorical_field(registry.labels_key, registry.label_categories, "_scvi_labels", "n_labels"),
        "size_factor": {"data_registry": {}, "state_registry": {}, "summary_stats": {}},
        "extra_categorical_covs": {
            "data_registry": {"attr_key": "_scvi_extra_categorical_covs", "attr_name": "obsm"} if categorical else {},
            "state_registry": {
                "mappings": {
                    key: np.asarray(registry.categorical_covariate_categories[key], dtype=object) for key in categorical
                },
                "field_keys": list(categorical),
                "n_cats_per_key": list(registry.n_cats_per_cov),
            }
            if categorical
            else {},
            "summary_stats": {"n_extra_categorical_covs": len(categorical)},
        },
        "extra_continuous_covs": {
            "data_registry": {"attr_key": "_scvi_extra_continuous_covs", "attr_name": "obsm"} if continuous else {},
            "state_registry": {"columns": np.asarray(continuous, dtype=object)} if continuous else {},
            "summary_stats": {"n_extra_continuous_covs": len(continuous)},
        },
    }
    return {
        "scvi_version": SCVI_TOOLS_VERSION,
        "model_name": "SCVI",
        "setup_method_name": "setup_anndata",
        "setup_args": {
            "layer": registry.layer,
            "batch_key": registry.batch_key,
            "labels_key": registry.labels_key,
            "size_factor_key": None,
            "categorical_covariate_keys": list(categorical) or None,
            "continuous_covariate_keys": list(continuous) or None,
        },
        "field_registries": fields,
        "_scvi_uuid": str(uuid.uuid4()),
    }


def from_ours(saved, module: VAE, history_frames: dict) -> dict:
    """scvi-tools' model.pt payload for a persist.SavedModel whose weights are `module`'s, with the history as
    scvi-tools keeps it (metric -> DataFrame). A size_factor_key registry cannot be written (scvi-tools would
    decode it with a softplus)."""
    registry = saved.registry
    if registry.size_factor_key:
        raise UnsupportedScviToolsModel(
            f"size_factor_key={registry.size_factor_key!r}: scvi-tools decodes such a model with a softplus, so it "
            "cannot be written in scvi-tools' format"
        )
    params = dict(saved.init_params)
    named = {key: params.pop(key) for key in NAMED_ARGUMENTS if key in params}
    return {
        "model_state_dict": _scvi_tools_state(module, saved.init_params),
        "var_names": np.asarray(saved.var_names, dtype=object),
        "attr_dict": {
            "init_params_": {"kwargs": {"kwargs": params}, "non_kwargs": named},
            "registry_": _scvi_tools_registry(registry),
            "history_": history_frames,
            "is_trained_": bool(saved.is_trained),
            "train_indices_": saved.train_indices,
            "validation_indices_": saved.validation_indices,
            "test_indices_": np.array([], dtype=np.int64),
            "get_normalized_function_name_": "get_normalized_expression",
        },
    }
