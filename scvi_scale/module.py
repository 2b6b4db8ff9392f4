"""scVI's variational auto-encoder (Lopez et al. 2018) as a torch module: what scvi-tools calls `VAE`.

Generative model for a cell with counts x (G genes), batch s and other covariates c:
    z ~ N(0, I) (L dims; "ln": the decoder sees softmax(z))
    l = log library: the observed log total count (default), or latent with the prior
        N(library_log_means[s], library_log_vars[s]), the mean and variance of log total counts in batch s
    px_scale = softmax over genes of the decoder's output for (z, s, c);  px_rate = exp(l) * px_scale
    x_g ~ ZINB(px_rate_g, theta_g, zero-inflation logits_g), NB(px_rate_g, theta_g) or Poisson(px_rate_g)
    theta (inverse dispersion) = exp(px_r): per gene, per gene and batch, per gene and label, or from a decoder head
Inference: q(z | log1p(x)[, s, c]) and, for a latent library, q(l | log1p(x)[, s, c]), both Normal.
Loss per cell (a negative ELBO): -log p(x | z, l) + kl_weight * KL(q(z) || p(z)) + KL(q(l) || p(l)); scvi-tools'
KL warm-up weighs the z term only.

A minibatch is a `Minibatch` of torch tensors (B cells), built once where its tensors are made (`to_tensors`, from
a sampler minibatch); the module's methods also take the dict form, with the same keys, converted at entry
(`Minibatch.of`):
    "x"           (B, G) float counts; may be absent when "x_csr" is given (made dense from it where needed)
    "batch"       (B,) or (B, 1) integer batch codes; may be absent when n_batch <= 1 (all cells in batch 0)
    "labels"      (B,) or (B, 1) integer label codes; read by dispersion "gene-label" only
    "cat_covs"    (B, k) integer codes of the k extra categorical covariates (n_cats_per_cov), when k > 0
    "cont_covs"   (B, c) float continuous covariates, when n_continuous_cov = c > 0
    "size_factor" (B,) or (B, 1) positive observed library to use instead of the row sum of x (scvi-tools'
                  size_factor_key also swaps the softmax for a softplus; here px_scale stays a softmax, so that
                  the fused decoder serves both)
    "x_csr"       optional (crow_indices (B + 1,), col_indices (nnz,), values (nnz,)): the same rows of x in CSR
                  form. The likelihood then reads the non-zeros from it, and so does the encoder's first product
                  (see `nn.linear_with_covariates`): torch.sparse.mm without a gradient (inference, validation),
                  in training the C kernel of kernels/csr_linear.py with the weight gradient. Where that kernel
                  does not run (no C compiler, a GPU), training keeps the dense product (torch's sparse product
                  with its weight gradient is not faster at 10% non-zeros), from x, or from x_csr alone with log1p
                  taken on the non-zeros before the input is made dense.
A minified model's minibatches hold "qzm", "qzv" (B, L) and "observed_lib_size" (B,) instead of the counts. Other
keys of the dict form are ignored. The per-step path checks shapes and dtypes only: reading a value back to the host
would cost a device sync per step, so code ranges and CSR structure are checked once at the data boundary
(`check_inputs`; the store's readers prove the CSR they hand out, the registry's encoding the codes). The
reconstruction term runs through `scvi_scale.kernels`, the single dispatch point of the fused likelihood ops.

Draws. The one reparameterised draw is `Encoder.draw` (loc + scale * noise, then the "ln" transform). Training
takes its noise from torch's generator; outputs pass their own standard normals (`inference(noise=...)`,
`draw_latent`), so that a cell's draws can be keyed by the cell (outputs/noise.py).

Parameter names follow scvi-tools' state dict (z_encoder, l_encoder, decoder, px_r, library_log_means/vars as
(1, n_batch) buffers). Unlike scvi-tools, parts that the chosen options never use are not built: l_encoder only
for a latent library, px_r only for "gene"/"gene-batch"/"gene-label" with NB or ZINB, the decoder's px_r head
only for "gene-cell" with NB or ZINB, its dropout head only for ZINB.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from scvi_scale import kernels
from scvi_scale.kernels import csr_linear
from scvi_scale.nn import DecoderSCVI, Encoder

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
GENE_LIKELIHOODS = ("zinb", "nb", "poisson", "normal")
BATCH_REPRESENTATIONS = ("one-hot", "embedding")
# What extra_encoder_kwargs / extra_decoder_kwargs may hold: the options our Encoder / DecoderSCVI take.
ENCODER_EXTRA_KEYS = ("var_eps", "activation_fn", "use_activation", "bias")
DECODER_EXTRA_KEYS = ("activation_fn", "use_activation", "bias")
LATENT_DISTRIBUTIONS = ("normal", "ln")
NORM_PLACEMENTS = ("none", "encoder", "decoder", "both")
GENERATIVE_OUTPUTS = ("px_scale", "px_rate", "theta", "zi_logits", "hidden")
# Per-cell sampler entries the module reads; a sampler's other entries (rows, library) stay on the host.
MODULE_KEYS = ("x", "batch", "labels", "cat_covs", "cont_covs", "size_factor", "qzm", "qzv", "observed_lib_size")
CSR_TENSORS = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (crow_indices (B + 1,), col_indices, values (nnz,))


@dataclass(frozen=True)
class Minibatch:
    """The module's input: B cells' tensors on one device, each field as the module docstring's key of the same
    name describes it; None where not given. Its values are not checked here (see `VAE.check_inputs`)."""

    x: torch.Tensor | None = None
    x_csr: CSR_TENSORS | None = None
    batch: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    cat_covs: torch.Tensor | None = None
    cont_covs: torch.Tensor | None = None
    size_factor: torch.Tensor | None = None
    qzm: torch.Tensor | None = None
    qzv: torch.Tensor | None = None
    observed_lib_size: torch.Tensor | None = None

    @classmethod
    def of(cls, tensors: Minibatch | Mapping) -> Minibatch:
        """`tensors` as a Minibatch: the dict form's entries of the fields' names (others are ignored), or a
        Minibatch as it is."""
        if isinstance(tensors, Minibatch):
            return tensors
        return cls(**{field.name: tensors[field.name] for field in fields(cls) if field.name in tensors})

    def repeated(self, k: int) -> Minibatch:
        """The cells repeated k times, draw after draw, without the counts: what decoding k draws at once reads."""
        counts = ("x", "x_csr")
        return Minibatch(**{f.name: _tile(getattr(self, f.name), k) for f in fields(self) if f.name not in counts})  # type: ignore[arg-type]  # fields by name


def to_tensors(minibatch: Mapping, device, cells: slice = slice(None)) -> Minibatch:
    """The module's input from a sampler minibatch (a dict of numpy arrays, see sampler.py) as tensors on
    `device` (no copy on the CPU), for the minibatch's cells `cells` (a slice). A CSR form of the counts,
    minibatch["x_csr"] = (indptr, indices, data), becomes x_csr = (crow_indices, col_indices, values) of those
    cells."""
    tensors: dict[str, Any] = {
        key: torch.from_numpy(np.ascontiguousarray(minibatch[key][cells])).to(device, non_blocking=True)
        for key in MODULE_KEYS
        if key in minibatch
    }
    if "x_csr" in minibatch:
        indptr, indices, data = minibatch["x_csr"]
        start, stop, _ = cells.indices(len(indptr) - 1)
        row_starts = indptr[start : stop + 1]
        entries = slice(row_starts[0], row_starts[-1])
        tensors["x_csr"] = tuple(
            torch.from_numpy(array).to(device, non_blocking=True)
            for array in (row_starts - row_starts[0], indices[entries], data[entries])
        )
    return Minibatch(**tensors)


def _tile(tensor: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """`tensor` (B, ...) repeated k times along its first axis, (k * B, ...); None stays None."""
    return tensor if tensor is None or k == 1 else tensor.repeat(k, *([1] * (tensor.dim() - 1)))


@dataclass
class CheckedMinibatch:
    """A Minibatch checked against the module's options, in the form the networks read. batch: (B,) int64;
    labels: (B,) int64 for "gene-label", else None; cat_covs: one (B,) int64 per extra categorical covariate;
    cont_covs: (B, c) or None; log_size_factor: (B, 1) or None; x_csr: x's CSR arrays or None; cached: (qzm (B, L),
    qzv (B, L), observed library (B,)) of a minified model, else None."""

    x: torch.Tensor | None
    batch: torch.Tensor
    labels: torch.Tensor | None
    cat_covs: list[torch.Tensor]
    cont_covs: torch.Tensor | None
    log_size_factor: torch.Tensor | None
    x_csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _codes(name: str, codes: torch.Tensor, n_cells: int) -> torch.Tensor:
    """codes (B,) or (B, 1) as int64 (B,); their range is checked by `VAE.check_inputs`, not here (no sync)."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"tensors[{name!r}] has dtype {codes.dtype}, expected integer codes")
    if tuple(codes.shape) not in ((n_cells,), (n_cells, 1)):
        raise ValueError(f"tensors[{name!r}] has shape {tuple(codes.shape)}, expected ({n_cells},)")
    return codes.reshape(n_cells).long()


def _check_code_range(name: str, codes: torch.Tensor, n_categories: int) -> None:
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n_categories):
        raise ValueError(
            f"tensors[{name!r}] has codes in [{int(codes.min())}, {int(codes.max())}], "
            f"expected codes in [0, {n_categories - 1}]"
        )


def _scattered_dense(csr: torch.Tensor) -> torch.Tensor:
    """A sparse CSR tensor as a dense one, by one scatter of its values (faster than torch's to_dense at
    minibatch sizes: benchmarks/history/from-code.md)."""
    n_rows, n_cols = csr.shape
    crow_indices = csr.crow_indices()
    rows = torch.repeat_interleave(torch.arange(n_rows, device=csr.device), crow_indices[1:] - crow_indices[:-1])
    dense = torch.zeros(n_rows * n_cols, dtype=csr.dtype, device=csr.device)
    return dense.scatter_(0, rows * n_cols + csr.col_indices(), csr.values()).view(n_rows, n_cols)


class VAE(nn.Module):
    """scVI's VAE. Options have scvi-tools' names and defaults (see the module docstring for the model).

    n_input: genes; n_batch: batches (0: none); n_labels: labels (used by dispersion "gene-label" only);
    n_continuous_cov / n_cats_per_cov: extra continuous covariates / category counts of the extra categorical
    covariates; use_batch_norm / use_layer_norm: "none", "encoder", "decoder" or "both";
    library_log_means / library_log_vars: (n_batch,) arrays (one entry when n_batch is 0), the per-batch mean and
    variance of log total counts, required when use_observed_lib_size is False.
    """

    library_log_means: torch.Tensor  # buffers, registered when use_observed_lib_size is False
    library_log_vars: torch.Tensor

    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_labels: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        n_continuous_cov: int = 0,
        n_cats_per_cov: list[int] | None = None,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        latent_distribution: str = "normal",
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        use_observed_lib_size: bool = True,
        library_log_means: np.ndarray | None = None,
        library_log_vars: np.ndarray | None = None,
        log_variational: bool = True,
        batch_representation: str = "one-hot",
        batch_embedding_kwargs: dict | None = None,
        var_activation=None,
        extra_encoder_kwargs: dict | None = None,
        extra_decoder_kwargs: dict | None = None,
    ):
        super().__init__()
        self.n_input = n_input
        self.n_batch = n_batch
        self.n_labels = n_labels
        self.n_latent = n_latent
        self.n_continuous_cov = n_continuous_cov
        self.n_cats_per_cov = [int(n) for n in (n_cats_per_cov or [])]
        self.dispersion = dispersion
        self.gene_likelihood = gene_likelihood
        self.latent_distribution = latent_distribution
        self.encode_covariates = encode_covariates
        self.use_observed_lib_size = use_observed_lib_size
        self.log_variational = log_variational
        self.batch_representation = batch_representation
        self._check_options(n_hidden, use_batch_norm, use_layer_norm, extra_encoder_kwargs, extra_decoder_kwargs)
        # Batch codes index a prior table with one row even when there are no batches.
        self.n_batch_codes = max(n_batch, 1)
        if not use_observed_lib_size:
            self.register_buffer("library_log_means", self._library_prior("library_log_means", library_log_means))
            self.register_buffer("library_log_vars", self._library_prior("library_log_vars", library_log_vars))
        self._build_networks(
            n_hidden,
            n_layers,
            dropout_rate,
            deeply_inject_covariates,
            use_batch_norm,
            use_layer_norm,
            batch_embedding_kwargs,
            var_activation,
            extra_encoder_kwargs or {},
            extra_decoder_kwargs or {},
        )

    def _check_options(
        self,
        n_hidden: int,
        use_batch_norm: str,
        use_layer_norm: str,
        extra_encoder_kwargs: dict | None,
        extra_decoder_kwargs: dict | None,
    ) -> None:
        """ValueError naming an option (these, and those __init__ kept as attributes) and what it may be, before
        any weight is drawn."""
        for name, value, choices in (
            ("dispersion", self.dispersion, DISPERSIONS),
            ("gene_likelihood", self.gene_likelihood, GENE_LIKELIHOODS),
            ("latent_distribution", self.latent_distribution, LATENT_DISTRIBUTIONS),
            ("use_batch_norm", use_batch_norm, NORM_PLACEMENTS),
            ("use_layer_norm", use_layer_norm, NORM_PLACEMENTS),
            ("batch_representation", self.batch_representation, BATCH_REPRESENTATIONS),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r}: expected one of {choices}")
        sizes = (("n_input", self.n_input), ("n_hidden", n_hidden), ("n_latent", self.n_latent))
        for size_name, size in sizes:
            if size < 1:
                raise ValueError(f"{size_name}={size}: must be at least 1")
        counts = (("n_batch", self.n_batch), ("n_labels", self.n_labels), ("n_continuous_cov", self.n_continuous_cov))
        for count_name, count in counts:
            if count < 0:
                raise ValueError(f"{count_name}={count}: must not be negative")
        if any(n < 1 for n in self.n_cats_per_cov):
            raise ValueError(f"n_cats_per_cov={self.n_cats_per_cov}: every covariate needs at least one category")
        if self.dispersion == "gene-batch" and self.n_batch < 1:
            raise ValueError("dispersion='gene-batch' needs n_batch >= 1")
        if self.dispersion == "gene-label" and self.n_labels < 1:
            raise ValueError("dispersion='gene-label' needs n_labels >= 1")
        for name, given, allowed in (
            ("extra_encoder_kwargs", extra_encoder_kwargs, ENCODER_EXTRA_KEYS),
            ("extra_decoder_kwargs", extra_decoder_kwargs, DECODER_EXTRA_KEYS),
        ):
            unknown = sorted(set(given or {}) - set(allowed))
            if unknown:
                raise ValueError(f"{name} {unknown}: the options these networks take are {list(allowed)}")

    def _build_networks(
        self,
        n_hidden: int,
        n_layers: int,
        dropout_rate: float,
        deeply_inject_covariates: bool,
        use_batch_norm: str,
        use_layer_norm: str,
        batch_embedding_kwargs: dict | None,
        var_activation,
        extra_encoder_kwargs: dict,
        extra_decoder_kwargs: dict,
    ) -> None:
        """px_r, the batch embedding (if any), z_encoder, l_encoder (latent library only) and decoder, in that order
        (the order their initial weights are drawn in), for the options __init__ took."""
        n_input, n_latent, n_continuous_cov = self.n_input, self.n_latent, self.n_continuous_cov
        # theta = exp(px_r); scvi-tools initialises px_r from a standard normal
        if self.gene_likelihood != "poisson" and self.dispersion != "gene-cell":
            columns = {"gene": (), "gene-batch": (self.n_batch,), "gene-label": (self.n_labels,)}[self.dispersion]
            self.px_r = nn.Parameter(torch.randn(n_input, *columns))
        encode_covariates, latent_distribution = self.encode_covariates, self.latent_distribution
        batch_norm_encoder = use_batch_norm in ("encoder", "both")
        batch_norm_decoder = use_batch_norm in ("decoder", "both")
        layer_norm_encoder = use_layer_norm in ("encoder", "both")
        layer_norm_decoder = use_layer_norm in ("decoder", "both")
        # "embedding": a learnt vector per batch joins the decoder's input (and the encoder's when covariates are
        # encoded) instead of a one-hot injected into every layer; scvi-tools' name for it in the state dict.
        n_embedded = 0
        if self.batch_representation == "embedding":
            embedding_options = {"embedding_dim": 5, **(batch_embedding_kwargs or {})}
            self._embeddings_dict = nn.ModuleDict({"batch": nn.Embedding(self.n_batch_codes, **embedding_options)})
            n_embedded = self._embeddings_dict["batch"].embedding_dim  # type: ignore[assignment]  # an int
        cat_list = [*([] if n_embedded else [self.n_batch]), *self.n_cats_per_cov]
        encoder_cat_list = cat_list if encode_covariates else None
        n_input_encoder = n_input + ((n_continuous_cov + n_embedded) if encode_covariates else 0)
        encoder_options = dict(
            n_cat_list=encoder_cat_list,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            inject_covariates=deeply_inject_covariates,
            use_batch_norm=batch_norm_encoder,
            use_layer_norm=layer_norm_encoder,
            var_activation=var_activation,
            **extra_encoder_kwargs,
        )
        self.z_encoder = Encoder(
            n_input_encoder, n_latent, n_layers=n_layers, distribution=latent_distribution, **encoder_options
        )
        if not self.use_observed_lib_size:
            self.l_encoder = Encoder(n_input_encoder, 1, n_layers=1, **encoder_options)
        self.decoder = DecoderSCVI(
            n_latent + n_continuous_cov + n_embedded,
            n_input,
            n_cat_list=cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            inject_covariates=deeply_inject_covariates,
            use_batch_norm=batch_norm_decoder,
            use_layer_norm=layer_norm_decoder,
            zero_inflated=self.gene_likelihood == "zinb",
            dispersion_per_cell=self.dispersion == "gene-cell" and self.gene_likelihood != "poisson",
            **extra_decoder_kwargs,
        )

    @classmethod
    def from_registry(cls, registry, **options) -> VAE:
        """A VAE sized for a `scvi_scale.data.Registry` (genes, batches, labels, covariates, library prior), with
        SCVI's keyword arguments `options` (n_hidden, n_latent, dispersion, ...)."""
        return cls(
            n_input=registry.n_vars,
            n_batch=registry.n_batch,
            n_labels=registry.n_labels,
            n_continuous_cov=registry.n_continuous_cov,
            n_cats_per_cov=registry.n_cats_per_cov or None,
            library_log_means=registry.library_log_means,
            library_log_vars=registry.library_log_vars,
            **options,
        )

    def _library_prior(self, name: str, values) -> torch.Tensor:
        """The per-batch library prior parameter as a float32 (1, n_batch_codes) tensor, like scvi-tools' buffer."""
        if values is None:
            raise ValueError(f"use_observed_lib_size=False needs {name}, one value per batch")
        values = torch.as_tensor(np.asarray(values, dtype=np.float32)).reshape(1, -1)
        if values.shape[1] != self.n_batch_codes:
            raise ValueError(f"{name} has {values.shape[1]} values, expected {self.n_batch_codes} (one per batch)")
        if not torch.all(torch.isfinite(values)):
            raise ValueError(f"{name} has non-finite values")
        if name == "library_log_vars" and not torch.all(values > 0):
            raise ValueError("library_log_vars must be positive (they are variances of log library sizes)")
        return values

    # ----------------------------------------------------------------------------------------------- inputs

    def _checked(self, tensors: Minibatch | Mapping, cells_like: torch.Tensor | None = None) -> CheckedMinibatch:
        """A minibatch (or its dict form) checked against the options the module was built with, shapes and dtypes
        only (see the module docstring). cells_like: for the decoder, which reads no counts: a tensor with one row
        per cell, used when the minibatch has neither x nor x_csr."""
        minibatch = Minibatch.of(tensors)
        n_cells, device, dtype = self._cells_of(minibatch, cells_like)
        batch, labels, cat_covs = self._checked_codes(minibatch, n_cells, device)
        return CheckedMinibatch(
            minibatch.x,
            batch,
            labels,
            cat_covs,
            self._checked_cont_covs(minibatch.cont_covs, n_cells, dtype),
            self._checked_log_size_factor(minibatch.size_factor, n_cells, dtype),
            self._checked_csr(minibatch.x_csr, n_cells),
            self._checked_cache(minibatch, n_cells, dtype),
        )

    def _cells_of(self, minibatch: Minibatch, cells_like: torch.Tensor | None) -> tuple[int, torch.device, torch.dtype]:
        """(B, device, floating dtype) of the minibatch: from x, x_csr, a minified model's qzm, or cells_like."""
        x, x_csr = minibatch.x, minibatch.x_csr
        if x is not None:
            if x.dim() != 2 or x.shape[1] != self.n_input or not x.dtype.is_floating_point:
                raise ValueError(
                    f"tensors['x'] is {x.dtype} of shape {tuple(x.shape)}, expected float counts of shape "
                    f"(cells, {self.n_input})"
                )
            return x.shape[0], x.device, x.dtype
        if x_csr is not None:
            if len(x_csr) != 3 or x_csr[0].dim() != 1 or not x_csr[2].dtype.is_floating_point:
                raise ValueError("tensors['x_csr'] must be (crow_indices, col_indices, float values)")
            return x_csr[0].shape[0] - 1, x_csr[2].device, x_csr[2].dtype
        if minibatch.qzm is not None:  # a minified model: the cached posterior stands in for the counts
            return minibatch.qzm.shape[0], minibatch.qzm.device, minibatch.qzm.dtype
        if cells_like is not None:
            return cells_like.shape[0], cells_like.device, cells_like.dtype
        raise ValueError("tensors has no 'x' (the counts), nor 'x_csr'")

    def _checked_codes(self, minibatch: Minibatch, n_cells: int, device: torch.device) -> tuple:
        """(batch (B,), labels (B,) or None, [each categorical covariate's codes (B,)]) as int64."""
        if minibatch.batch is not None:
            batch = _codes("batch", minibatch.batch, n_cells)
        elif self.n_batch <= 1:
            batch = torch.zeros(n_cells, dtype=torch.long, device=device)
        else:
            raise ValueError(f"tensors has no 'batch', needed with n_batch={self.n_batch}")
        labels = None
        if self.dispersion == "gene-label":  # the only use of labels in scVI
            if minibatch.labels is None:
                raise ValueError("tensors has no 'labels', needed by dispersion='gene-label'")
            labels = _codes("labels", minibatch.labels, n_cells)
        n_extra, columns = len(self.n_cats_per_cov), minibatch.cat_covs
        if not n_extra:
            if columns is not None and columns.shape[-1] > 0:  # (B, 0): none, as Registry.encode gives
                raise ValueError("tensors has 'cat_covs' but the module was built with no categorical covariates")
            return batch, labels, []
        if columns is None:
            raise ValueError(f"tensors has no 'cat_covs', needed with n_cats_per_cov={self.n_cats_per_cov}")
        if tuple(columns.shape) != (n_cells, n_extra):
            raise ValueError(f"tensors['cat_covs'] has shape {tuple(columns.shape)}, expected ({n_cells}, {n_extra})")
        return batch, labels, [_codes(f"cat_covs[:, {j}]", columns[:, j], n_cells) for j in range(n_extra)]

    def _checked_cont_covs(self, cont_covs: torch.Tensor | None, n_cells: int, dtype) -> torch.Tensor | None:
        """The continuous covariates (B, c) in the counts' dtype, or None when the module has none."""
        if not self.n_continuous_cov:
            if cont_covs is not None and cont_covs.shape[-1] > 0:
                raise ValueError("tensors has 'cont_covs' but the module was built with n_continuous_cov=0")
            return None
        if cont_covs is None:
            raise ValueError(f"tensors has no 'cont_covs', needed with n_continuous_cov={self.n_continuous_cov}")
        if tuple(cont_covs.shape) != (n_cells, self.n_continuous_cov):
            raise ValueError(
                f"tensors['cont_covs'] has shape {tuple(cont_covs.shape)}, "
                f"expected ({n_cells}, {self.n_continuous_cov})"
            )
        return cont_covs.to(dtype)

    def _checked_log_size_factor(self, size_factor: torch.Tensor | None, n_cells: int, dtype) -> torch.Tensor | None:
        """log(size_factor) (B, 1), the observed library given instead of the row sums of x; None when not given."""
        if size_factor is None:
            return None
        if not self.use_observed_lib_size:
            raise ValueError(
                "tensors has 'size_factor' (an observed library) but the module was built with "
                "use_observed_lib_size=False (a latent library)"
            )
        if tuple(size_factor.shape) not in ((n_cells,), (n_cells, 1)):
            raise ValueError(f"tensors['size_factor'] has shape {tuple(size_factor.shape)}, expected ({n_cells},)")
        return torch.log(size_factor.reshape(n_cells, 1).to(dtype))

    @staticmethod
    def _checked_csr(x_csr: CSR_TENSORS | None, n_cells: int) -> CSR_TENSORS | None:
        """x_csr, its arrays' shapes checked against the B rows (their values: check_inputs)."""
        if x_csr is None:
            return None
        if len(x_csr) != 3:
            raise ValueError("tensors['x_csr'] must be (crow_indices, col_indices, values)")
        crow_indices, col_indices, values = x_csr
        if tuple(crow_indices.shape) != (n_cells + 1,) or col_indices.shape != values.shape or values.dim() != 1:
            raise ValueError(
                f"tensors['x_csr'] has arrays of shapes {[tuple(a.shape) for a in x_csr]}, expected "
                f"({n_cells + 1},), (nnz,), (nnz,) for the {n_cells} rows of x"
            )
        return x_csr

    def _checked_cache(self, minibatch: Minibatch, n_cells: int, dtype) -> tuple | None:
        """A minified model's (qzm (B, L), qzv (B, L), observed library (B,)) in the counts' dtype, else None."""
        if minibatch.qzm is None:
            return None
        if minibatch.qzv is None or minibatch.observed_lib_size is None:
            raise ValueError("a minified model's minibatch needs qzv and observed_lib_size beside qzm")
        cached = (minibatch.qzm.to(dtype), minibatch.qzv.to(dtype), minibatch.observed_lib_size.to(dtype))
        if tuple(cached[0].shape) != (n_cells, self.n_latent) or cached[1].shape != cached[0].shape:
            raise ValueError(
                f"tensors['qzm'] / ['qzv'] have shapes {tuple(cached[0].shape)} / {tuple(cached[1].shape)}, "
                f"expected ({n_cells}, {self.n_latent})"
            )
        return cached

    def check_inputs(self, tensors: Minibatch | Mapping) -> None:
        """The value checks the per-step path leaves out (they read values back to the host): category codes
        within the module's sizes and a well-formed x_csr, on top of `_checked`'s shape checks. For the data
        boundary, once: e.g. on the per-cell obs arrays of a whole store, or on a minibatch a caller built."""
        tensors = Minibatch.of(tensors)
        minibatch = self._checked(tensors, cells_like=self._cells_like(tensors))
        _check_code_range("batch", minibatch.batch, self.n_batch_codes)
        if minibatch.labels is not None:
            _check_code_range("labels", minibatch.labels, self.n_labels)
        for j, (codes, n_cat) in enumerate(zip(minibatch.cat_covs, self.n_cats_per_cov)):
            _check_code_range(f"cat_covs[:, {j}]", codes, n_cat)
        if minibatch.x_csr is not None:
            crow_indices, col_indices, values = minibatch.x_csr
            try:
                with warnings.catch_warnings():  # torch calls its CSR tensors beta; the operations used are tested
                    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
                    torch.sparse_csr_tensor(
                        crow_indices,
                        col_indices,
                        values,
                        (crow_indices.shape[0] - 1, self.n_input),
                        check_invariants=True,
                    )
            except RuntimeError as error:
                raise ValueError(f"tensors['x_csr'] is not a valid CSR matrix of x's shape: {error}") from error

    @staticmethod
    def _cells_like(minibatch: Minibatch) -> torch.Tensor | None:
        """A per-cell tensor of `minibatch` that tells the number of cells when there are no counts."""
        per_cell = (minibatch.batch, minibatch.labels, minibatch.cat_covs, minibatch.cont_covs, minibatch.size_factor)
        return next((tensor for tensor in per_cell if tensor is not None), None)

    # -------------------------------------------------------------------------------------------- inference

    def inference(self, tensors: Minibatch | Mapping, n_samples: int = 1, noise: dict | None = None) -> dict:
        """q(z | x) and the library. Returns
            qz:      Normal over the untransformed latent, loc and scale (B, L)
            z:       a draw, transformed ("ln": softmax), (B, L), or (n_samples, B, L) when n_samples > 1
            library: log library (B, 1) or (n_samples, B, 1): observed, or a draw of ql
            ql:      Normal over the log library (B, 1), or None when the library is observed
        noise: the standard normals of the draws, {"z": (n_samples, B, L), "library": (n_samples, B, 1)} (library
        only for a latent library); default torch's generator. Draws are reparameterised (differentiable).
        """
        if n_samples < 1:
            raise ValueError(f"n_samples={n_samples}: must be at least 1")
        return self._inference(self._checked(tensors), n_samples, noise)

    def draw_latent(self, qz: Normal, noise: torch.Tensor) -> torch.Tensor:
        """z = loc + scale * noise, transformed as the decoder sees it ("ln": softmax): noise (..., B, L) standard
        normals, result of the same shape."""
        return self.z_encoder.draw(qz, noise)

    def _encoder_input(self, minibatch: CheckedMinibatch) -> torch.Tensor:
        """log1p(x) (x itself without log_variational), with the continuous covariates and the batch embedding
        appended when covariates are encoded: (B, n_input_encoder). Sparse CSR when x_csr is given, there are no
        appended columns and the first product can take it (`_first_layer_reads_csr`: it then skips the zeros)."""
        appended = []
        if self.encode_covariates:
            appended = [t for t in (minibatch.cont_covs, self._batch_embedding(minibatch.batch)) if t is not None]
        transform = torch.log1p if self.log_variational else None
        if minibatch.x_csr is not None and not appended and self._first_layer_reads_csr(minibatch):
            return self._csr_counts(minibatch, transform)
        if minibatch.x is not None:
            encoder_input = minibatch.x if transform is None else transform(minibatch.x)
        else:  # x_csr alone: the transform runs on the non-zeros, one scatter makes the input dense
            encoder_input = _scattered_dense(self._csr_counts(minibatch, transform))
        return torch.cat([encoder_input, *appended], dim=-1) if appended else encoder_input

    @staticmethod
    def _first_layer_reads_csr(minibatch: CheckedMinibatch) -> bool:
        """Whether the encoders' first product takes x as CSR: without a gradient (torch.sparse.mm), or with one
        where the C kernel runs (kernels/csr_linear.py); else x is made dense first."""
        values = minibatch.x_csr[2]  # type: ignore[index]  # called when x_csr is given
        return not torch.is_grad_enabled() or csr_linear.ready_for(values.device, values.dtype)

    def _batch_embedding(self, batch: torch.Tensor) -> torch.Tensor | None:
        """The batch embedding (B, d) for batch_representation="embedding", else None."""
        return self._embeddings_dict["batch"](batch) if self.batch_representation == "embedding" else None

    def _covariate_codes(self, minibatch: CheckedMinibatch) -> tuple:
        """The category codes the networks one-hot encode: batch (unless embedded) and the categorical
        covariates."""
        batch = () if self.batch_representation == "embedding" else (minibatch.batch,)
        return (*batch, *minibatch.cat_covs)

    def _csr_counts(self, minibatch: CheckedMinibatch, transform=None) -> torch.Tensor:
        """x_csr as a sparse CSR tensor (B, G), `transform` applied to its values. Not checked here (that costs a
        device sync): the store's readers prove the CSR they hand out, check_inputs proves one built by hand."""
        crow_indices, col_indices, values = minibatch.x_csr  # type: ignore[misc]  # called when x_csr is given
        shape = (crow_indices.shape[0] - 1, self.n_input)
        with warnings.catch_warnings():  # torch calls its CSR tensors beta; the operations used here are tested
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            values = values if transform is None else transform(values)
            return torch.sparse_csr_tensor(crow_indices, col_indices, values, shape, check_invariants=False)

    def _dense_counts(self, minibatch: CheckedMinibatch) -> torch.Tensor:
        """x (B, G); made from x_csr, once (by one scatter), when only the CSR form was given."""
        if minibatch.x is None:
            minibatch.x = _scattered_dense(self._csr_counts(minibatch))
        return minibatch.x

    def _library_sizes(self, minibatch: CheckedMinibatch) -> torch.Tensor:
        """Observed library sizes (B, 1): the row sums of x (in float64 from x_csr, exact for integer counts)."""
        if minibatch.x is not None:
            return minibatch.x.sum(dim=1, keepdim=True)
        crow_indices, _, values = minibatch.x_csr  # type: ignore[misc]  # x is None: x_csr is given
        running = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
        return (running[crow_indices[1:]] - running[crow_indices[:-1]]).to(values.dtype).unsqueeze(1)

    def _inference(self, minibatch: CheckedMinibatch, n_samples: int = 1, noise: dict | None = None) -> dict:
        noise = noise or {}
        if minibatch.cached is not None:  # minified: q(z | x) was stored, the counts are not read
            qzm, qzv, observed_library = minibatch.cached
            qz = Normal(qzm, qzv.sqrt(), validate_args=False)
            z = self.z_encoder.draw(qz, self._draw_noise(noise.get("z"), qz, n_samples))
            library = torch.log(observed_library.reshape(-1, 1))
            return {
                "qz": qz,
                "z": z,
                "library": library.expand(n_samples, -1, -1) if n_samples > 1 else library,
                "ql": None,
            }
        encoder_input = self._encoder_input(minibatch)
        encoder_codes = self._covariate_codes(minibatch) if self.encode_covariates else ()
        qz = self.z_encoder(encoder_input, *encoder_codes)
        z = self.z_encoder.draw(qz, self._draw_noise(noise.get("z"), qz, n_samples))
        ql = None
        if not self.use_observed_lib_size:
            ql = self.l_encoder(encoder_input, *encoder_codes)
            library = self.l_encoder.draw(ql, self._draw_noise(noise.get("library"), ql, n_samples))
        else:
            library = minibatch.log_size_factor  # type: ignore[assignment]  # None is replaced below
            if library is None:
                library = torch.log(self._library_sizes(minibatch))
            if n_samples > 1:
                library = library.expand(n_samples, -1, -1)
        return {"qz": qz, "z": z, "library": library, "ql": ql}

    @staticmethod
    def _draw_noise(noise: torch.Tensor | None, posterior: Normal, n_samples: int) -> torch.Tensor:
        """Standard normals for n_samples draws of `posterior` (B, D): (B, D) for one draw, else (S, B, D)."""
        shape = tuple(posterior.loc.shape) if n_samples == 1 else (n_samples, *posterior.loc.shape)
        if noise is None:
            return torch.empty(shape, dtype=posterior.loc.dtype, device=posterior.loc.device).normal_()
        if n_samples == 1 and noise.dim() == len(shape) + 1 and noise.shape[0] == 1:
            noise = noise[0]  # (1, B, D): the leading draws axis of one draw
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} for {n_samples} draw(s) of {tuple(shape[-2:])}")
        return noise.to(posterior.loc.dtype)

    # ------------------------------------------------------------------------------------------- generative

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        tensors: Minibatch | Mapping,
        transform_batch: int | None = None,
        outputs: tuple[str, ...] = GENERATIVE_OUTPUTS,
    ) -> dict:
        """p(x | z, l) for one draw. z: (B, L) (transformed); library: (B, 1) or (B,) log library.

        transform_batch: decode every cell as if it came from this batch (batch-corrected outputs); it sets the
        batch for the decoder's covariates and for the "gene-batch" dispersion. Returns the `outputs` asked for
        (all by default; each (B, G) head costs as much as the softmax decoder, so inference asks for what it uses):
            px_scale  (B, G) expected fraction of each gene (rows sum to 1)
            px_rate   (B, G) expected counts, exp(library) * px_scale
            theta     inverse dispersion: (G,) for "gene", (B, G) otherwise; None for Poisson
            zi_logits (B, G) zero-inflation logits for ZINB, else None
            hidden    (B, n_hidden) the decoder's last hidden layer
        """
        unknown = set(outputs) - set(GENERATIVE_OUTPUTS)
        if unknown:
            raise ValueError(f"outputs {sorted(unknown)}: expected some of {GENERATIVE_OUTPUTS}")
        if z.dim() != 2 or z.shape[1] != self.n_latent:
            raise ValueError(
                f"z has shape {tuple(z.shape)}, expected (cells, {self.n_latent}): decode one draw at a time"
            )
        minibatch = self._checked(tensors, cells_like=z)
        if transform_batch is not None:
            if not 0 <= int(transform_batch) < self.n_batch_codes:
                raise ValueError(
                    f"transform_batch={transform_batch}: expected a batch in [0, {self.n_batch_codes - 1}]"
                )
            minibatch.batch = torch.full_like(minibatch.batch, int(transform_batch))
        return self._generative(z, library.reshape(-1, 1), minibatch, outputs)

    def _generative(
        self, z: torch.Tensor, library: torch.Tensor, minibatch: CheckedMinibatch, outputs=GENERATIVE_OUTPUTS
    ) -> dict:
        hidden = self._decoder_hidden(z, minibatch)
        result = {"hidden": hidden}
        if "px_scale" in outputs or "px_rate" in outputs:
            px_scale = torch.softmax(self.decoder.px_scale_decoder(hidden), dim=-1)
            if "px_rate" in outputs:
                result["px_rate"] = torch.exp(library) * px_scale
            if "px_scale" in outputs:
                result["px_scale"] = px_scale
        if "theta" in outputs:
            result["theta"] = self._theta(hidden, minibatch)  # type: ignore[assignment]  # None for Poisson
        if "zi_logits" in outputs:
            zinb = self.gene_likelihood == "zinb"
            result["zi_logits"] = self.decoder.px_dropout_decoder(hidden) if zinb else None  # type: ignore[misc,assignment]
        return result

    def _decoder_hidden(self, z: torch.Tensor, minibatch: CheckedMinibatch) -> torch.Tensor:
        """The decoder's last hidden layer (B, n_hidden): continuous covariates (and a batch embedding) join z at
        the input, the batch (one-hot) and categorical covariates are injected."""
        joined = [t for t in (minibatch.cont_covs, self._batch_embedding(minibatch.batch)) if t is not None]
        decoder_input = torch.cat([z, *joined], dim=-1) if joined else z
        return self.decoder(decoder_input, *self._covariate_codes(minibatch))

    def _theta(self, hidden: torch.Tensor, minibatch: CheckedMinibatch) -> torch.Tensor | None:
        """Inverse dispersion exp(px_r) (for "normal": the standard deviation): (G,) for "gene", (B, G) for the
        others; None for Poisson."""
        if self.gene_likelihood == "poisson":
            return None
        log_theta: torch.Tensor
        if self.dispersion == "gene":
            log_theta = self.px_r
        elif self.dispersion == "gene-batch":
            log_theta = self.px_r.t()[minibatch.batch]
        elif self.dispersion == "gene-label":
            log_theta = self.px_r.t()[minibatch.labels]
        else:
            log_theta = self.decoder.px_r_decoder(hidden)  # type: ignore[misc]  # built for "gene-cell"
        return torch.exp(log_theta)

    def _likelihood_counts(self, minibatch: CheckedMinibatch) -> torch.Tensor:
        """The counts as the fused ops take them: the sparse CSR tensor when x_csr is given (the CPU path reads only
        the non-zeros, with no search for them in a dense x), else x."""
        return self._csr_counts(minibatch) if minibatch.x_csr is not None else minibatch.x  # type: ignore[return-value]

    def _log_likelihood(self, z: torch.Tensor, library: torch.Tensor, minibatch: CheckedMinibatch) -> torch.Tensor:
        """log p(x | z, l) per cell (B,), through the fused ops. z: (B, L); library: (B, 1)."""
        if self.gene_likelihood == "normal":  # scvi-tools' Normal(px_rate, exp(px_r)), for non-count data: unfused
            outputs = self._generative(z, library, minibatch, ("px_rate", "theta"))
            normal = Normal(outputs["px_rate"], outputs["theta"].expand_as(outputs["px_rate"]), validate_args=False)
            return normal.log_prob(self._dense_counts(minibatch)).sum(dim=-1)
        if self.dispersion == "gene-cell" and self.gene_likelihood != "poisson":
            # theta comes from a head of the hidden layer: the fused decoder takes theta as an input, so the
            # gene-wise outputs are formed here and only the likelihood is fused.
            outputs = self._generative(z, library, minibatch)
            return kernels.count_log_likelihood(
                self._likelihood_counts(minibatch),
                outputs["px_rate"],
                outputs["theta"],
                outputs["zi_logits"],
                self.gene_likelihood,
            )
        hidden = self._decoder_hidden(z, minibatch)
        zero_inflated = self.gene_likelihood == "zinb"
        dropout_head = self.decoder.px_dropout_decoder
        return kernels.decoder_log_likelihood(
            hidden,
            self.decoder.px_scale_decoder.weight,
            self.decoder.px_scale_decoder.bias,
            library,
            self._likelihood_counts(minibatch),
            theta=self._theta(hidden, minibatch),
            dropout_weight=dropout_head.weight if zero_inflated else None,  # type: ignore[union-attr]  # zinb has it
            dropout_bias=dropout_head.bias if zero_inflated else None,  # type: ignore[union-attr]
            likelihood=self.gene_likelihood,
        )

    # ------------------------------------------------------------------------------------------------- loss

    def _library_prior_for(self, batch: torch.Tensor) -> Normal:
        """p(l | s): Normal with the batch's log-library mean and variance, loc and scale (B, 1)."""
        means = self.library_log_means[0, batch].unsqueeze(-1)
        variances = self.library_log_vars[0, batch].unsqueeze(-1)
        return Normal(means, variances.sqrt(), validate_args=False)

    def loss(self, tensors: Minibatch | Mapping, kl_weight: float = 1.0) -> dict:
        """The negative ELBO on one minibatch. Returns per-cell (B,) tensors
            reconstruction_loss  -log p(x | z, l)
            kl_z                 KL(q(z | x) || N(0, I))
            kl_l                 KL(q(l | x) || p(l | s)), zeros when the library is observed
            kl_local             kl_z + kl_l
        and the scalar "loss" = mean over cells of reconstruction_loss + kl_weight * kl_z + kl_l.
        """
        minibatch = self._checked(tensors)
        inference = self._inference(minibatch)
        reconstruction_loss = -self._log_likelihood(inference["z"], inference["library"], minibatch)
        qz = inference["qz"]
        # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1) / 2 - log s, written out (kl_divergence needs a prior Normal)
        kl_z = (0.5 * (qz.loc.square() + qz.scale.square() - 1) - torch.log(qz.scale)).sum(dim=-1)
        if inference["ql"] is None:
            kl_l = torch.zeros_like(kl_z)
        else:
            kl_l = kl_divergence(inference["ql"], self._library_prior_for(minibatch.batch)).sum(dim=-1)
        return {
            "loss": torch.mean(reconstruction_loss + kl_weight * kl_z + kl_l),
            "reconstruction_loss": reconstruction_loss,
            "kl_local": kl_z + kl_l,
            "kl_z": kl_z,
            "kl_l": kl_l,
        }

    def _repeated(self, minibatch: CheckedMinibatch, k: int) -> CheckedMinibatch:
        """The minibatch's cells repeated k times (draw after draw), for decoding k draws in one pass."""
        if k == 1:
            return minibatch
        return CheckedMinibatch(
            _tile(self._dense_counts(minibatch), k),
            _tile(minibatch.batch, k),  # type: ignore[arg-type]  # a tensor stays a tensor
            _tile(minibatch.labels, k),
            [_tile(codes, k) for codes in minibatch.cat_covs],  # type: ignore[misc]
            _tile(minibatch.cont_covs, k),
            _tile(minibatch.log_size_factor, k),
            None,
        )

    @torch.no_grad()
    def marginal_ll(
        self, tensors: Minibatch | Mapping, n_mc_samples: int, n_mc_samples_per_pass: int = 1
    ) -> torch.Tensor:
        """Importance-sampled log p(x) per cell (B,) with n_mc_samples draws from q (call in eval mode):
            log (1/K) sum_k p(x | z_k, l_k) p(z_k) p(l_k) / (q(z_k | x) q(l_k | x))
        The densities of z are taken on the untransformed draw, so the estimate is the same for "ln" (the
        softmax's Jacobian cancels between p and q); the l terms appear only for a latent library.
        n_mc_samples_per_pass draws are decoded at once (the cells repeated), as scvi-tools batches them.
        """
        if n_mc_samples < 1:
            raise ValueError(f"n_mc_samples={n_mc_samples}: must be at least 1")
        per_pass = max(1, min(int(n_mc_samples_per_pass), n_mc_samples))
        minibatch = self._checked(tensors)
        inference = self._inference(minibatch)
        qz, ql = inference["qz"], inference["ql"]
        standard_normal = Normal(torch.zeros_like(qz.loc), torch.ones_like(qz.scale), validate_args=False)
        library_prior = None if ql is None else self._library_prior_for(minibatch.batch)
        log_weights = []
        for first in range(0, n_mc_samples, per_pass):
            k = min(per_pass, n_mc_samples - first)
            z_draw = qz.sample((k,))  # (k, B, L)
            library = inference["library"].expand(k, -1, -1) if ql is None else ql.sample((k,))
            log_weight = (
                self._log_likelihood(
                    self.z_encoder.transform(z_draw).flatten(0, 1), library.flatten(0, 1), self._repeated(minibatch, k)
                ).reshape(k, -1)
                + standard_normal.log_prob(z_draw).sum(dim=-1)
                - qz.log_prob(z_draw).sum(dim=-1)
            )
            if ql is not None:
                log_weight = log_weight + (library_prior.log_prob(library) - ql.log_prob(library)).sum(dim=-1)  # type: ignore[union-attr]
            log_weights.append(log_weight)
        return torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(n_mc_samples)
