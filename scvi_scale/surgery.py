"""Reference weights for a query model (scArches' architecture surgery, Lotfollahi et al. 2022) and their freezing.

    >>> transfer_reference_weights(query_module, reference_state_dict, n_reference_batch)
    >>> freeze_for_query(query_module, n_reference_batch)          # scvi-tools' defaults
    >>> frozen = partly_frozen(query_module)                         # the training loop, after each step:
    >>> restore_frozen_entries(frozen)

Surgery. A query module is built for the reference's batches plus the query's new ones (Registry.extend_batches),
so the linear maps that take the batch one-hot are wider. `transfer_reference_weights` copies the reference's
weights into it; the columns of the new batches keep their fresh initialisation.

Freezing follows scvi-tools' `_set_params_online_update` (same options, same defaults): the fully connected blocks'
linear maps are the only weights that learn (plus the library encoder, and the batch norms unless frozen), and
within them only the columns of the new batches, unless freeze_expression=False (the encoder's first layer learns
whole) or freeze_decoder_first_layer=False (the decoder's). Two deliberate differences from scvi-tools, so that
frozen reference weights stay bit-identical:
- scvi-tools lets every covariate column of a hooked layer learn (reference batches and other covariates too);
  here only the new batches' columns do. Query cells of a reference batch leave that batch's weights as they are.
  With dispersion "gene-batch" the new batches' columns of px_r learn too (scvi-tools freezes px_r whole).
- Adam's weight decay adds decay * w to every gradient inside optimizer.step(), after the gradient hooks that
  zero the frozen entries, so in scvi-tools a query run with weight_decay > 0 (its default 1e-6) moves frozen
  weights slightly. Here the training loop copies the frozen entries of partly frozen weights back after every
  step (`restore_frozen_entries`, on its own optimizer's parameters only); fully frozen weights have
  requires_grad=False and are never given to the optimizer.
Frozen batch norms get momentum 0, so their running statistics do not move (num_batches_tracked still counts).
The freezing lives on the module object: a query model saved and loaded again trains whole; map it again (as the
reference) to fine-tune with freezing again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from scvi_scale.nn import FCLayers

if TYPE_CHECKING:
    from scvi_scale.module import VAE

ENCODER_MODULES = ("z_encoder", "l_encoder")
# scvi-tools leaves the library encoder out of the freezing: it learns whole, with no hooks.
UNFROZEN_MODULES = ("l_encoder",)


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
    return [(index, block[0]) for index, block in enumerate(fc.fc_layers) if fc._injects_into(index)]  # type: ignore[index]  # Sequentials, typed Module


def transfer_reference_weights(module: VAE, reference_state: dict, n_reference_batch: int) -> None:
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


def partly_frozen(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` that learn only in some entries (see freeze_for_query)."""
    return [parameter for parameter in module.parameters() if hasattr(parameter, _FROZEN_ATTR)]


@torch.no_grad()
def restore_frozen_entries(parameters: list[nn.Parameter]) -> None:
    """Copy the reference values back into the frozen entries of partly frozen `parameters`; the training loop
    calls this after each optimizer step (Adam's weight decay moves entries whose gradient was zeroed)."""
    for parameter in parameters:
        trainable, reference = getattr(parameter, _FROZEN_ATTR)
        if trainable.device != parameter.device:
            trainable, reference = trainable.to(parameter.device), reference.to(parameter.device)
            setattr(parameter, _FROZEN_ATTR, (trainable, reference))
        parameter.copy_(torch.where(trainable, parameter, reference))


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
    module: VAE,
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
            linear = block[0]  # type: ignore[index]  # a Sequential, typed Module
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
