"""The PyTorch path of the fused ops: what runs on CPU tensors, and on CUDA when the backend is "torch".

All three ops are written from the formulas below, in the numerically stable forms, and differentiated by
autograd. Shapes: B cells, G genes, H hidden units.

Negative binomial with mean mu and inverse dispersion theta, for a count x:
    log NB(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
                + theta * log(theta / (theta + mu)) + x * log(mu / (theta + mu))
    The two parts are written as
        dense part, every entry:   L0 = -theta * log1p(mu / theta)              (= log NB(0))
        sparse part, x > 0 only:   -x * softplus(log theta - log mu) - log x - log B(x, theta)
    because the three lgamma terms cancel exactly at x = 0 and equal -log x - log B(x, theta) elsewhere. Most
    entries of single-cell counts are zeros (~90%), so the expensive special functions run on ~10% of the entries.
    log B(x, theta) is evaluated so that it stays accurate in float32 when one argument is large (counts to 1e5,
    theta to 1e4), where lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) would lose everything to cancellation.
Zero-inflated NB with dropout probability pi = sigmoid(z), z the logits:
    x = 0:  log(pi + (1 - pi) NB(0)) = logaddexp(z, L0) - softplus(z)
    x > 0:  log((1 - pi) NB(x))      = -softplus(z) + log NB(x)
Poisson with mean mu:
    log P(x) = x log mu - mu - lgamma(x + 1)     (x log mu and lgamma(x + 1) vanish at x = 0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LIKELIHOODS = ("zinb", "nb", "poisson")

# lgamma(z) = (z - 1/2) log z - z + log(2 pi) / 2 + stirling_correction(z); with five terms of the series the
# truncation error at z >= 8 is below 3e-13, so the same cut-off serves float32 and float64.
STIRLING_MIN = 8.0


def stirling_correction(z: torch.Tensor) -> torch.Tensor:
    """The remainder of Stirling's series for lgamma, 1/(12 z) - 1/(360 z^3) + ..., valid for z >= STIRLING_MIN."""
    r = 1.0 / z
    r2 = r * r
    return r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 * (1 / 1680 - r2 / 1188))))


def log_beta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log B(a, b) = lgamma(a) + lgamma(b) - lgamma(a + b) for a, b > 0, accurate for any sizes.

    With s = min(a, b) and t = max(a, b) >= STIRLING_MIN, lgamma(t) - lgamma(s + t) is taken from Stirling's
    series, where the large parts cancel analytically:
        lgamma(t) - lgamma(s + t) = -(t - 1/2) log1p(s / t) - s log(s + t) + s + w(t) - w(s + t)
    with w = stirling_correction. Otherwise all three lgammas are small and are used as they are.
    """
    small = torch.minimum(a, b)
    big = torch.maximum(a, b)
    lgamma_small = torch.lgamma(small)
    big_stirling = big.clamp(min=STIRLING_MIN)  # keeps the branch that torch.where drops finite
    via_stirling = (
        lgamma_small
        - (big_stirling - 0.5) * torch.log1p(small / big_stirling)
        - small * torch.log(small + big_stirling)
        + small
        + stirling_correction(big_stirling)
        - stirling_correction(small + big_stirling)
    )
    direct = lgamma_small + torch.lgamma(big) - torch.lgamma(small + big)
    return torch.where(big >= STIRLING_MIN, via_stirling, direct)


def count_log_prob_per_cell(
    x: torch.Tensor,
    mu: torch.Tensor,
    log_mu: torch.Tensor | None,
    theta: torch.Tensor | None,
    zi_logits: torch.Tensor | None,
    likelihood: str,
) -> torch.Tensor:
    """Per-cell sum over genes of log p(x), sparse-aware. Inputs are validated by the caller.

    x, mu: (B, G); theta: (G,) or (B, G); zi_logits: (B, G). log_mu: (B, G) when the caller holds log mu exactly
    (the decoder does), else None and log mu is taken at the nonzero entries only. Returns (B,) in mu's dtype.
    """
    nonzero = (x > 0).nonzero(as_tuple=True)
    rows, cols = nonzero
    x_nz = x[nonzero]
    log_mu_nz = torch.log(mu[nonzero]) if log_mu is None else log_mu[nonzero]
    per_cell = torch.zeros(x.shape[0], dtype=mu.dtype, device=mu.device)

    if likelihood == "poisson":
        sparse = x_nz * log_mu_nz - torch.lgamma(x_nz + 1)
        return per_cell.index_add(0, rows, sparse) - mu.sum(-1)

    theta_nz = theta[cols] if theta.dim() == 1 else theta[nonzero]
    log_nb_zero = -theta * torch.log1p(mu / theta)  # (B, G)
    sparse = (
        -x_nz * F.softplus(torch.log(theta_nz) - log_mu_nz) - torch.log(x_nz) - log_beta(x_nz, theta_nz)
    )
    if likelihood == "nb":
        dense = log_nb_zero
    else:
        is_zero = x == 0
        dense = torch.where(is_zero, torch.logaddexp(zi_logits, log_nb_zero), log_nb_zero) - F.softplus(zi_logits)
    return per_cell.index_add(0, rows, sparse) + dense.sum(-1)


def count_log_likelihood(x, mu, theta, zi_logits, likelihood: str) -> torch.Tensor:
    """PyTorch path of `scvi_scale.kernels.count_log_likelihood` (see there). Returns (B,)."""
    return count_log_prob_per_cell(x, mu, None, theta, zi_logits, likelihood)


def decoder_log_likelihood(
    hidden, scale_weight, scale_bias, log_library, x, theta, dropout_weight, dropout_bias, likelihood: str
) -> torch.Tensor:
    """PyTorch path of `scvi_scale.kernels.decoder_log_likelihood` (see there). Returns (B,)."""
    log_px_scale = torch.log_softmax(F.linear(hidden, scale_weight, scale_bias), dim=-1)
    log_mu = log_library[:, None] + log_px_scale
    zi_logits = F.linear(hidden, dropout_weight, dropout_bias) if likelihood == "zinb" else None
    return count_log_prob_per_cell(x, torch.exp(log_mu), log_mu, theta, zi_logits, likelihood)


@torch.no_grad()
def decoder_px_scale(hidden, scale_weight, scale_bias, gene_chunk: int | None) -> torch.Tensor:
    """PyTorch path of `scvi_scale.kernels.decoder_px_scale` (see there). Returns (B, G) float32.

    With `gene_chunk`, the logits are made `gene_chunk` genes at a time, twice: once for the per-cell
    log-sum-exp, once to write the normalized chunk, so the temporaries stay B x gene_chunk.
    """
    hidden, scale_weight, scale_bias = (t.float() for t in (hidden, scale_weight, scale_bias))
    n_genes = scale_weight.shape[0]
    if gene_chunk is None or gene_chunk >= n_genes:
        return torch.softmax(F.linear(hidden, scale_weight, scale_bias), dim=-1)
    chunks = [slice(start, start + gene_chunk) for start in range(0, n_genes, gene_chunk)]
    chunk_lse = [torch.logsumexp(F.linear(hidden, scale_weight[c], scale_bias[c]), dim=-1) for c in chunks]
    log_normalizer = torch.logsumexp(torch.stack(chunk_lse, dim=-1), dim=-1, keepdim=True)
    px_scale = torch.empty(hidden.shape[0], n_genes, dtype=torch.float32, device=hidden.device)
    for c in chunks:
        torch.exp(F.linear(hidden, scale_weight[c], scale_bias[c]) - log_normalizer, out=px_scale[:, c])
    return px_scale
