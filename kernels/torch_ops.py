"""The PyTorch path of the fused ops: what runs on CPU tensors, and on CUDA when the backend is "torch".

Shapes: B cells, G genes, H hidden units. Every formula is written so that float32 keeps ~1e-6 relative accuracy per
entry over counts 0..1e5, theta 1e-4..1e4 and logits +-30, where the textbook forms lose everything (lgamma(x + theta)
- lgamma(theta) - lgamma(x + 1) at x = 1e5 or theta = 1e4 cancels to a few units out of 1e6). tl_math.py writes the
same formulas in Triton; the functions below are their reference on the PyTorch side.

Log-probabilities, for mean mu, inverse dispersion theta and zero-inflation logits z (pi = sigmoid(z)):
    Poisson, x > 0  -stirlerr(x) - bd0(x, mu) - log(2 pi x) / 2                       (Loader's saddle-point form)
    Poisson, x = 0  -mu
    NB, x > 0       stirlerr(x + theta) - stirlerr(theta) - stirlerr(x) - bd0(theta, theta (x + theta) / (theta + mu))
                    - bd0(x, mu (x + theta) / (theta + mu)) - log(2 pi x) / 2 - log1p(x / theta) / 2
                    (the binomial-style form R's dnbinom_mu uses: every term is small or of one sign)
    NB, x = 0       L0 = -theta log1p(mu / theta)
    ZINB, x > 0     -softplus(z) + log NB(x)
    ZINB, x = 0     log(pi + (1 - pi) e^L0) = log1p(-u) with u = sigmoid(-z) (-expm1(L0)) when u <= 1/2,
                    else logaddexp(z, L0) - softplus(z) (each form is accurate where it is used)
with stirlerr(z) = lgamma(z + 1) - (z + 1/2) log z + z - log(2 pi) / 2 and bd0(a, b) = a log(a / b) + b - a >= 0.

Gradients, with v = (x - mu) / (theta + mu):
    d/d(log mu):  Poisson  x - mu;  NB  theta (x - mu) / (theta + mu) = theta v;  ZINB  w theta v
    d/d theta:    NB  h(v) + E(x, theta);  ZINB  w (h(v) + E(x, theta))
    d/dz:         ZINB x > 0  -sigmoid(z);  x = 0  -expm1(L0) sigmoid(z - L0) sigmoid(-z)
where w = 1 at x > 0 and w = sigmoid(L0 - z) (the share of NB(0) in p(0)) at x = 0, h(v) = log1p(v) - v, and
E(x, theta) = digamma(x + theta) - digamma(theta) - log1p(x / theta), which is 0 at x = 0.

Sparse-aware: at x = 0 nothing but L0 and the logits is needed, so stirlerr, bd0 and E, the expensive parts, are
evaluated at the nonzero entries only (~10% of single-cell counts), gathered with nonzero(). From COMPILE_MIN_ENTRIES
entries on, both parts run through torch.compile (see there).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

LIKELIHOODS = ("zinb", "nb", "poisson")
logger = logging.getLogger("scvi_scale.kernels")

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# Stirling's series for lgamma is used from z >= 8 on: with five terms its truncation error there is below 3e-13,
# so one cut-off serves float32 and float64. Below it, stirlerr uses lgamma and E shifts its argument up by 8.
STIRLING_MIN = 8.0
# bd0(a, b) and h(v) switch to their series where the direct form cancels: bd0 where |v| < BD0_SERIES_MAX (as
# Loader's), h where |v| < H_SERIES_MAX (its direct form loses 4 eps / v^2 relative). odd_series reaches float64
# accuracy on both ranges: its argument stays below max(0.1^2, (0.5 / 1.5)^2) = 1/9.
BD0_SERIES_MAX = 0.1
H_SERIES_MAX = 0.5
ODD_SERIES_DENOMINATORS = tuple(range(35, 1, -2))  # 35, 33, ..., 3: the series 1/3 + t/5 + ... in Horner order


def stirling_correction(z: torch.Tensor) -> torch.Tensor:
    """w(z) = lgamma(z) - (z - 1/2) log z + z - log(2 pi)/2 = 1/(12 z) - 1/(360 z^3) + ..., for z >= STIRLING_MIN.

    It equals stirlerr(z) (lgamma(z + 1) = lgamma(z) + log z)."""
    r = 1.0 / z
    r2 = r * r
    return r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 * (1 / 1680 - r2 / 1188))))


def stirling_correction_derivative(z: torch.Tensor) -> torch.Tensor:
    """w'(z) = -1/(12 z^2) + 1/(120 z^4) - ..., for z >= STIRLING_MIN; digamma(z) = log z - 1/(2 z) + w'(z)."""
    r2 = 1.0 / (z * z)
    return -r2 * (1 / 12 - r2 * (1 / 120 - r2 * (1 / 252 - r2 * (1 / 240 - r2 / 132))))


def odd_series(t: torch.Tensor) -> torch.Tensor:
    """sum_{j >= 1} t^(j - 1) / (2 j + 1) = 1/3 + t/5 + t^2/7 + ..., for 0 <= t <= 1/9, in Horner form.

    17 terms reach float64 accuracy there ((1/9)^17 < 2e-17); float32 needs 8 ((1/9)^8 < 3e-8)."""
    denominators = ODD_SERIES_DENOMINATORS if t.dtype == torch.float64 else ODD_SERIES_DENOMINATORS[-8:]
    acc = torch.full_like(t, 1 / denominators[0])
    for denominator in denominators[1:]:
        acc = acc * t + 1 / denominator
    return acc


def stirlerr(z: torch.Tensor) -> torch.Tensor:
    """lgamma(z + 1) - (z + 1/2) log z + z - log(2 pi)/2 for z > 0 (Stirling's remainder; 0.0810 at z = 1)."""
    large = stirling_correction(z.clamp(min=STIRLING_MIN))
    small = torch.lgamma(z + 1) - (z + 0.5) * torch.log(z) + z - HALF_LOG_2PI
    return torch.where(z >= STIRLING_MIN, large, small)


def bd0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a log(a / b) + b - a >= 0 for a, b > 0, without cancellation when a is close to b (Loader 2000).

    With v = (a - b) / (a + b): a log(a / b) = 2 a (v + v^3/3 + v^5/5 + ...), so bd0 = (a - b) v + 2 a v^3 (1/3 + ...).
    """
    v = (a - b) / (a + b)
    near = v.abs() < BD0_SERIES_MAX
    v_near = torch.where(near, v, 0.0)  # the series is only evaluated (and differentiated) where it converges
    series = (a - b) * v_near + 2 * a * v_near**3 * odd_series(v_near * v_near)
    return torch.where(near, series, a * torch.log(a / b) + b - a)


def log1p_minus_identity(v: torch.Tensor, one_plus_v: torch.Tensor) -> torch.Tensor:
    """h(v) = log1p(v) - v for v > -1, given v and 1 + v each computed without cancellation.

    Near 0, where h ~ -v^2/2: with w = v / (2 + v), log1p(v) = 2 (w + w^3/3 + ...) and 2 w - v = -v w, so
    h = -v w + 2 w^3 (1/3 + w^2/5 + ...). Elsewhere log(one_plus_v) - v: for v = (x - mu) / (theta + mu) close to -1
    (theta << mu, x = 0), 1 + v = (theta + x) / (theta + mu) keeps digits that 1 + v rounded from v has lost.
    """
    near = v.abs() < H_SERIES_MAX
    v_near = torch.where(near, v, 0.0)
    w = v_near / (2 + v_near)
    series = -v_near * w + 2 * w**3 * odd_series(w * w)
    return torch.where(near, series, torch.log(one_plus_v) - v)


def digamma_difference_remainder(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """E(x, theta) = digamma(x + theta) - digamma(theta) - log1p(x / theta) for x >= 0, theta > 0; E(0, theta) = 0.

    theta >= 8: from digamma(z) = log z - 1/(2z) + w'(z), E = x / (2 theta (x + theta)) + w'(x + theta) - w'(theta).
    theta < 8:  digamma(z + 1) = digamma(z) + 1/z shifts theta to t = theta + 8:
        E(x, theta) = E(x, t) + sum_{k < 8} x / ((theta + k)(x + theta + k)) + log(1 - q),
        q = 8 x / ((theta + 8)(theta + x)); log(1 - q) is log1p(-q) for q < 1/2, else the log of the exact ratio
        theta (theta + 8 + x) / ((theta + 8)(theta + x)) = 1 - q, so no form is used where it cancels.
    """
    large_theta = theta >= STIRLING_MIN
    t = torch.where(large_theta, theta, theta + STIRLING_MIN)
    remainder = x / (2 * t * (x + t)) + stirling_correction_derivative(x + t) - stirling_correction_derivative(t)
    shift = sum(x / ((theta + k) * (x + theta + k)) for k in range(int(STIRLING_MIN)))
    q = STIRLING_MIN * x / ((theta + STIRLING_MIN) * (theta + x))
    log_one_minus_q = torch.where(
        q < 0.5,
        torch.log1p(-q.clamp(max=0.5)),
        torch.log(theta * (theta + STIRLING_MIN + x) / ((theta + STIRLING_MIN) * (theta + x))),
    )
    return torch.where(large_theta, remainder, remainder + shift + log_one_minus_q)


def log_poisson_positive(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """log Poisson(x; mu) for x > 0."""
    return -stirlerr(x) - bd0(x, mu) - 0.5 * torch.log(2 * math.pi * x)


def log_nb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(x; mu, theta) for x > 0."""
    trials = x + theta
    return (
        stirlerr(trials)
        - stirlerr(theta)
        - stirlerr(x)
        - bd0(theta, theta * trials / (theta + mu))
        - bd0(x, mu * trials / (theta + mu))
        - 0.5 * torch.log(2 * math.pi * x)
        - 0.5 * torch.log1p(x / theta)
    )


def log_zinb_zero(log_nb_zero: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """log(pi + (1 - pi) e^L0) for L0 = log NB(0) <= 0 and pi = sigmoid(zi_logits)."""
    u = torch.sigmoid(-zi_logits) * -torch.expm1(log_nb_zero)
    small_u = u <= 0.5
    return torch.where(
        small_u,
        torch.log1p(-torch.where(small_u, u, 0.0)),
        torch.logaddexp(zi_logits, log_nb_zero) - F.softplus(zi_logits),
    )


def dense_terms(x, mu, theta, zi_logits, likelihood: str):
    """The parts of the likelihood every entry needs, x: (B, G). Returns
    (sum over genes of log p at the zeros and of -softplus(z) at the nonzeros, (B,);
     d log p / d log mu, (B, G); d log p / d theta but for E(x, theta), (B, G) or None; d log p / dz, (B, G) or None).
    """
    is_zero = x == 0
    if likelihood == "poisson":
        return -torch.where(is_zero, mu, 0.0).sum(-1), x - mu, None, None
    theta_plus_mu = theta + mu
    log_nb_zero = -theta * torch.log1p(mu / theta)
    v = (x - mu) / theta_plus_mu
    d_log_mu = theta * v
    d_theta = log1p_minus_identity(v, (theta + x) / theta_plus_mu)
    if likelihood == "nb":
        return torch.where(is_zero, log_nb_zero, 0.0).sum(-1), d_log_mu, d_theta, None
    log_p_rest = torch.where(is_zero, log_zinb_zero(log_nb_zero, zi_logits), -F.softplus(zi_logits))
    nb_share = torch.where(is_zero, torch.sigmoid(log_nb_zero - zi_logits), 1.0)
    d_zi_zero = -torch.expm1(log_nb_zero) * torch.sigmoid(zi_logits - log_nb_zero) * torch.sigmoid(-zi_logits)
    d_zi = torch.where(is_zero, d_zi_zero, -torch.sigmoid(zi_logits))
    return log_p_rest.sum(-1), d_log_mu * nb_share, d_theta * nb_share, d_zi


def nonzero_terms(x, mu, theta, likelihood: str):
    """The parts only the nonzero counts need, on 1-D gathers of them: (log NB(x) or log Poisson(x), E(x, theta) or
    None). ZINB's -softplus(z) at x > 0 is in dense_terms."""
    if likelihood == "poisson":
        return log_poisson_positive(x, mu), None
    return log_nb_positive(x, mu, theta), digamma_difference_remainder(x, theta)


# torch.compile fuses dense_terms' ~60 elementwise ops into one loop: at 1024 x 2000 on 2 CPU cores that is ~15x faster
# than eager (benchmarks/kernels.py), and a whole training step at batch 128 x 2000 genes runs 1.9x faster (34 ms
# against 67 ms, 1 thread). It pays for its compile time (~10-30 s, then cached on disk) only on inputs of a
# training minibatch's size or more, and needs a C++ toolchain, so it is used from COMPILE_MIN_ENTRIES entries on
# (batch 128 x 1024 genes) and dropped for eager if it fails.
COMPILE_MIN_ENTRIES = 1 << 17
_compiled: dict = {}


def _maybe_compiled(function, n_entries: int):
    """`function` compiled by torch.compile (shapes dynamic) for inputs of n_entries >= COMPILE_MIN_ENTRIES,
    else `function` itself."""
    if n_entries < COMPILE_MIN_ENTRIES or _compiled.get(function, True) is None:
        return function
    if function not in _compiled:
        _compiled[function] = torch.compile(function, dynamic=True)
    compiled = _compiled[function]

    def run(*args):
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager function computes the same
            logger.warning("torch.compile of %s failed (%s: %s); running it eagerly from now on",
                           function.__name__, type(error).__name__, error)
            _compiled[function] = None
            return function(*args)

    return run


class CountLogLikelihood(torch.autograd.Function):
    """Per-cell sum of log p(x) with the gradients of the module docstring, computed in the forward pass.

    The forward keeps d log p / d(log mu), d/d theta and d/dz per entry (B x G each, only those needed) and the
    backward scales them by the incoming per-cell gradient; this costs memory but no second pass over the data.
    Takes the mean as `mean` (mu, or log mu when `mean_is_log`: the decoder has log mu exactly), returns (B,).
    """

    @staticmethod
    def forward(ctx, x, mean, theta, zi_logits, likelihood: str, mean_is_log: bool):
        mu = torch.exp(mean) if mean_is_log else mean
        per_cell, d_log_mu, d_theta, d_zi = _maybe_compiled(dense_terms, x.numel())(
            x, mu, theta, zi_logits, likelihood)
        nonzero = (x > 0).nonzero(as_tuple=True)
        theta_nz = None if theta is None else theta.expand_as(x)[nonzero]
        log_p_nz, e_nz = _maybe_compiled(nonzero_terms, x.numel())(x[nonzero], mu[nonzero], theta_nz, likelihood)
        per_cell = per_cell.index_add(0, nonzero[0], log_p_nz)
        if d_theta is not None:
            d_theta.index_put_(nonzero, e_nz, accumulate=True)  # the nonzeros' NB share is 1: E adds unscaled

        ctx.theta_per_gene = theta is not None and theta.dim() == 1
        d_mean = d_log_mu if mean_is_log else d_log_mu / mu
        ctx.save_for_backward(*(g if need else None for g, need in zip(
            (d_mean, d_theta, d_zi), ctx.needs_input_grad[1:4])))
        return per_cell

    @staticmethod
    def backward(ctx, grad_per_cell):
        d_mean, d_theta, d_zi = ctx.saved_tensors
        scale = grad_per_cell[:, None]
        grad_mean = None if d_mean is None else d_mean * scale
        grad_zi = None if d_zi is None else d_zi * scale
        grad_theta = None
        if d_theta is not None:
            grad_theta = grad_per_cell @ d_theta if ctx.theta_per_gene else d_theta * scale
        return None, grad_mean, grad_theta, grad_zi, None, None


def count_log_likelihood(x, mu, theta, zi_logits, likelihood: str) -> torch.Tensor:
    """PyTorch path of `scvi_scale.kernels.count_log_likelihood` (see there). Returns (B,)."""
    return CountLogLikelihood.apply(x, mu, theta, zi_logits, likelihood, False)


def decoder_log_likelihood(
    hidden, scale_weight, scale_bias, log_library, x, theta, dropout_weight, dropout_bias, likelihood: str
) -> torch.Tensor:
    """PyTorch path of `scvi_scale.kernels.decoder_log_likelihood` (see there). Returns (B,)."""
    log_mu = log_library[:, None] + torch.log_softmax(F.linear(hidden, scale_weight, scale_bias), dim=-1)
    zi_logits = F.linear(hidden, dropout_weight, dropout_bias) if likelihood == "zinb" else None
    return CountLogLikelihood.apply(x, log_mu, theta, zi_logits, likelihood, True)


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
