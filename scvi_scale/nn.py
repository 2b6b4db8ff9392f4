"""The networks of scVI: fully connected blocks with covariate injection, the encoder and the decoder.

Shapes: B cells, G genes, H hidden units, L latent dimensions. Categorical covariates enter as integer codes of
shape (B,) or (B, 1) and are one-hot encoded here; a covariate with one category (or none) carries no information
and is left out, as scvi-tools does.

Architecture and defaults follow scvi-tools' `FCLayers`, `Encoder` and `DecoderSCVI`, and parameter names follow
their state dict where that is free (`fc_layers.Layer 0.0.weight` is the first linear map, `.1.` its batch norm),
so that a later step can load scvi-tools weights:
    one block = Linear -> BatchNorm1d (momentum 0.01, eps 0.001) -> LayerNorm (no affine) -> ReLU -> Dropout
with the norms and dropout present only when asked for. The one-hot covariates are concatenated after the block's
input, in the order of `n_cat_list`, into the first block always and into every later block when
`inject_covariates` is true.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Normal

from scvi_scale.kernels import csr_linear

# scvi-tools' batch-norm settings (inherited from the original TensorFlow scVI).
BATCH_NORM_MOMENTUM = 0.01
BATCH_NORM_EPS = 0.001


def one_hot_covariates(
    codes: Sequence[torch.Tensor], n_cat_list: Sequence[int], dtype: torch.dtype
) -> list[torch.Tensor]:
    """One-hot encodings (B, n_cat) of the categorical covariates with more than one category.

    codes: one integer tensor (B,) or (B, 1) per entry of n_cat_list, each code in [0, n_cat): the data boundary
    checks the range once (VAE.check_inputs); a code out of range here is an index error of scatter.
    """
    if len(codes) != len(n_cat_list):
        raise ValueError(f"got {len(codes)} categorical covariates, the network was built for {len(n_cat_list)}")
    encodings = []
    for code, n_cat in zip(codes, n_cat_list):
        if n_cat > 1:  # scatter, not F.one_hot: one_hot reads the codes' range back to the host (a device sync)
            code = code.reshape(-1, 1).long()
            encodings.append(torch.zeros(code.shape[0], n_cat, dtype=dtype, device=code.device).scatter_(1, code, 1.0))
    return encodings


def linear_with_covariates(linear: nn.Linear, x: torch.Tensor, covariates: list[torch.Tensor]) -> torch.Tensor:
    """linear([x, *covariates]) with the inputs concatenated along the last axis.

    x: (B, n) dense, or sparse CSR. The sparse products skip the zeros. Where a gradient is wanted and the C
    kernel runs (kernels/csr_linear.py: float32 CPU tensors), it computes the product and the weight's gradient
    from the stored entries; x and the covariates get no gradient there. Otherwise torch.sparse.mm, whose backward
    is slower than the dense product's, so the encoder hands x over as CSR in training only where the C kernel
    runs (see module.VAE).
    """
    if not x.is_sparse_csr:
        return linear(torch.cat([x, *covariates], dim=-1) if covariates else x)
    if torch.is_grad_enabled() and csr_linear.ready_for(x.device, x.dtype):
        dense = torch.cat(covariates, dim=-1) if covariates else None
        return csr_linear.csr_linear(x.crow_indices(), x.col_indices(), x.values(), dense, linear.weight, linear.bias)
    n_sparse = x.shape[1]
    out = torch.sparse.mm(x, linear.weight[:, :n_sparse].t())
    if covariates:
        out = out + torch.cat(covariates, dim=-1) @ linear.weight[:, n_sparse:].t()
    return out if linear.bias is None else out + linear.bias


class FCLayers(nn.Module):
    """A stack of fully connected blocks with one-hot covariates injected into the linear maps.

    n_in -> n_hidden -> ... -> n_out over n_layers blocks (n_layers=1: n_in -> n_out). Each block's linear map
    takes sum(n_cat for n_cat in n_cat_list if n_cat > 1) extra inputs where covariates are injected.
    activation_fn (a module class, default ReLU), use_activation and bias are scvi-tools' FCLayers options.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        activation_fn: type[nn.Module] = nn.ReLU,
        use_activation: bool = True,
        bias: bool = True,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers={n_layers}: need at least one layer")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={dropout_rate}: expected a value in [0, 1)")
        self.n_cat_list = list(n_cat_list or [])
        self.inject_covariates = inject_covariates
        n_covariate_inputs = sum(n_cat for n_cat in self.n_cat_list if n_cat > 1)
        widths = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        blocks = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            injected = n_covariate_inputs if self._injects_into(index) else 0
            parts: list[nn.Module] = [nn.Linear(width_in + injected, width_out, bias=bias)]
            if use_batch_norm:
                parts.append(nn.BatchNorm1d(width_out, momentum=BATCH_NORM_MOMENTUM, eps=BATCH_NORM_EPS))
            if use_layer_norm:
                parts.append(nn.LayerNorm(width_out, elementwise_affine=False))
            if use_activation:
                parts.append(activation_fn())
            if dropout_rate > 0:
                parts.append(nn.Dropout(p=dropout_rate))
            blocks.append((f"Layer {index}", nn.Sequential(*parts)))
        self.fc_layers = nn.Sequential(OrderedDict(blocks))

    def _injects_into(self, block_index: int) -> bool:
        return block_index == 0 or self.inject_covariates

    def forward(self, x: torch.Tensor, *cat_codes: torch.Tensor) -> torch.Tensor:
        """x: (B, n_in), dense or sparse CSR; cat_codes: one integer tensor (B,) or (B, 1) per entry of
        n_cat_list. Returns (B, n_out)."""
        covariates = one_hot_covariates(cat_codes, self.n_cat_list, x.dtype)
        linear: nn.Linear  # each block is a Sequential (Linear, then the rest): torch types its items as Module
        rest: list[nn.Module]
        for index, block in enumerate(self.fc_layers):
            linear, *rest = block  # type: ignore[misc]
            x = linear_with_covariates(linear, x, covariates if self._injects_into(index) else [])
            for layer in rest:
                x = layer(x)
        return x


class Encoder(nn.Module):
    """q(latent | input): a Normal whose mean and variance come from an FCLayers stack.

    variance = var_activation(var_encoder(h)) + var_eps (default exp; scvi-tools' var_eps = 1e-4 keeps it away
    from zero); other keyword arguments (activation_fn, use_activation, bias) go to FCLayers. With
    distribution "ln" (logistic normal) the returned sample is softmax-transformed; the Normal itself, and so
    the KL term, stays in the untransformed space.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        distribution: str = "normal",
        var_eps: float = 1e-4,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        var_activation=None,
        **fc_options,
    ):
        super().__init__()
        if distribution not in ("normal", "ln"):
            raise ValueError(f"distribution={distribution!r}: expected 'normal' or 'ln'")
        self.distribution = distribution
        self.var_eps = var_eps
        self.var_activation = torch.exp if var_activation is None else var_activation
        self.encoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
            **fc_options,
        )
        self.mean_encoder = nn.Linear(n_hidden, n_output)
        self.var_encoder = nn.Linear(n_hidden, n_output)

    def transform(self, sample: torch.Tensor) -> torch.Tensor:
        """Maps a draw of the Normal to the latent space: identity, or softmax over the last axis for "ln"."""
        return torch.softmax(sample, dim=-1) if self.distribution == "ln" else sample

    def draw(self, posterior: Normal, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The reparameterised draw loc + scale * noise, transformed: (..., B, n_output), differentiable in loc and
        scale. noise: standard normals of shape (S, B, n_output) or (B, n_output); None draws one set from torch's
        generator (as Normal.rsample does)."""
        if noise is None:
            noise = torch.empty_like(posterior.loc).normal_()
        return self.transform(posterior.loc + posterior.scale * noise)

    def forward(self, x: torch.Tensor, *cat_codes: torch.Tensor) -> Normal:
        """x: (B, n_input). Returns the Normal q, loc and scale (B, n_output)."""
        hidden = self.encoder(x, *cat_codes)
        mean = self.mean_encoder(hidden)
        variance = self.var_activation(self.var_encoder(hidden)) + self.var_eps
        # validate_args=False: checking scale > 0 reads it back to the host (a device sync per step)
        return Normal(mean, variance.sqrt(), validate_args=False)


class DecoderSCVI(nn.Module):
    """p(x | z, covariates): an FCLayers stack (no dropout) and linear heads over the genes.

    px_scale_decoder: logits of px_scale = softmax over genes (the expected fraction of each gene);
    px_dropout_decoder: zero-inflation logits (built when `zero_inflated`); px_r_decoder: log inverse
    dispersion per cell and gene (built when `dispersion_per_cell`). The heads' weights are read directly by
    the fused likelihood, so the (B, G) outputs need not exist during training. fc_options (activation_fn,
    use_activation, bias) go to FCLayers.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        inject_covariates: bool = True,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
        zero_inflated: bool = True,
        dispersion_per_cell: bool = False,
        **fc_options,
    ):
        super().__init__()
        self.px_decoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=0.0,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
            **fc_options,
        )
        self.px_scale_decoder = nn.Linear(n_hidden, n_output)
        self.px_r_decoder = nn.Linear(n_hidden, n_output) if dispersion_per_cell else None
        self.px_dropout_decoder = nn.Linear(n_hidden, n_output) if zero_inflated else None

    def forward(self, z: torch.Tensor, *cat_codes: torch.Tensor) -> torch.Tensor:
        """z: (B, n_input), the latent (with any continuous covariates appended). Returns the last hidden
        layer (B, n_hidden), from which the heads compute the gene-wise outputs."""
        return self.px_decoder(z, *cat_codes)
