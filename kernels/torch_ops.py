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
                    else the log of the sum pi + (1 - pi) e^L0 (each form is accurate where it is used)
with stirlerr(z) = lgamma(z + 1) - (z + 1/2) log z + z - log(2 pi) / 2 and bd0(a, b) = a log(a / b) + b - a >= 0.

Gradients, with v = (x - mu) / (theta + mu):
    d/d(log mu):  Poisson  x - mu;  NB  theta (x - mu) / (theta + mu) = theta v;  ZINB  w theta v
    d/d theta:    NB  h(v) + E(x, theta);  ZINB  w (h(v) + E(x, theta))
    d/dz:         ZINB x > 0  -sigmoid(z);  x = 0  -expm1(L0) sigmoid(z - L0) sigmoid(-z)
where w = 1 at x > 0 and w = sigmoid(L0 - z) (the share of NB(0) in p(0)) at x = 0, h(v) = log1p(v) - v, and
E(x, theta) = digamma(x + theta) - digamma(theta) - log1p(x / theta), which is 0 at x = 0.

Sparse-aware, in two passes (all_terms): zero_count_terms evaluates every entry as if its count were 0 (L0, the
logits: four transcendentals an entry for ZINB), then nonzero_count_terms evaluates stirlerr, bd0 and E, the
expensive parts, at the non-zero counts only (~10% of single-cell counts, read from a CSR tensor or found with
nonzero()) and their results are written over the dense ones. From COMPILE_MIN_ENTRIES entries on, both passes run
as one torch.compile'd call (see there). Where the C kernel builds (native.py), it computes the same terms instead
(count_terms(native=True)) and nothing is compiled by torch. The decoder op (DecoderLogLikelihood) keeps only
per-entry gradients (B x G each, at most three), so its backward is four products and no elementwise pass.

CSR minibatches (x_csr) made the training step faster than dense ones (benchmarks/profile_step.py; the figures:
benchmarks/history/from-code.md).
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from scvi_scale.kernels import native as native_kernel

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


# stirlerr(n) for the counts n = 1 .. 7, in float64 from math.lgamma; from 8 on stirling_correction is exact to 3e-13.
STIRLERR_SMALL_COUNTS = tuple(
    math.lgamma(n + 1) - (n + 0.5) * math.log(n) + n - 0.5 * math.log(2 * math.pi) for n in range(1, int(STIRLING_MIN))
)


def stirlerr_of_counts(n: torch.Tensor) -> torch.Tensor:
    """stirlerr(n) for integer-valued n >= 1 (counts): a table below STIRLING_MIN, the series from there on; no
    lgamma."""
    out = stirling_correction(n.clamp(min=STIRLING_MIN))
    for count, value in enumerate(STIRLERR_SMALL_COUNTS, start=1):
        out = torch.where(n == count, value, out)
    return out


def bd0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a log(a / b) + b - a >= 0 for a, b > 0, without cancellation when a is close to b (Loader 2000).

    With v = (a - b) / (a + b): a log(a / b) = 2 a (v + v^3/3 + v^5/5 + ...), so bd0 = (a - b) v + 2 a v^3 (1/3 + ...).
    """
    v = (a - b) / (a + b)
    near = v.abs() < BD0_SERIES_MAX
    v_near = torch.where(near, v, 0.0)  # the series is only evaluated (and differentiated) where it converges
    series = (a - b) * v_near + 2 * a * v_near**3 * odd_series(v_near * v_near)
    return torch.where(near, series, a * torch.log(a / b) + b - a)


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


def log_poisson_positive(x: torch.Tensor, mu: torch.Tensor, stirlerr_x: torch.Tensor) -> torch.Tensor:
    """log Poisson(x; mu) for x > 0, given stirlerr(x)."""
    return -stirlerr_x - bd0(x, mu) - 0.5 * torch.log(2 * math.pi * x)


def log_nb_positive(x, mu, theta, stirlerr_x, stirlerr_theta) -> torch.Tensor:
    """log NB(x; mu, theta) for x > 0, given stirlerr(x) and stirlerr(theta) (for counts a table lookup, and theta's
    is made once per gene: only stirlerr(x + theta) is evaluated per entry)."""
    trials = x + theta
    return (
        stirlerr(trials)
        - stirlerr_theta
        - stirlerr_x
        - bd0(theta, theta * trials / (theta + mu))
        - bd0(x, mu * trials / (theta + mu))
        - 0.5 * torch.log(2 * math.pi * x)
        - 0.5 * torch.log1p(x / theta)
    )


def h_series(v: torch.Tensor) -> torch.Tensor:
    """h(v) = log1p(v) - v for |v| < H_SERIES_MAX, where its direct form cancels: with w = v / (2 + v),
    log1p(v) = 2 (w + w^3/3 + ...) and 2 w - v = -v w, so h = -v w + 2 w^3 (1/3 + w^2/5 + ...)."""
    w = v / (2 + v)
    return -v * w + 2 * w**3 * odd_series(w * w)


def log1p_minus_identity(v: torch.Tensor, one_plus_v: torch.Tensor) -> torch.Tensor:
    """h(v) = log1p(v) - v for v > -1, given v and 1 + v each computed without cancellation.

    The series (h_series) where |v| < H_SERIES_MAX, elsewhere log(one_plus_v) - v: for v = (x - mu) / (theta + mu)
    close to -1 (theta << mu), 1 + v = (theta + x) / (theta + mu) keeps digits that 1 + v rounded from v has lost.
    """
    near = v.abs() < H_SERIES_MAX
    return torch.where(near, h_series(torch.where(near, v, 0.0)), torch.log(one_plus_v) - v)


def one_minus_exp(y: torch.Tensor, exp_y: torch.Tensor) -> torch.Tensor:
    """1 - e^y = -expm1(y) for y <= 0, given e^y: -y (1 + y/2! + y^2/3! + ...) for y > -1/2, else 1 - e^y.

    Written out because inductor's vectorized CPU expm1 is exp(y) - 1, which loses all digits near 0. The series
    terms are below 2^-53 of the sum from y^16/17! on at |y| = 1/2 (float32: y^9/10!, < 2^-24)."""
    near = y > -0.5
    y_near = torch.where(near, y, 0.0)
    n_terms = 16 if y.dtype == torch.float64 else 9
    acc = torch.full_like(y_near, 1 / math.factorial(n_terms + 1))
    for k in range(n_terms, 0, -1):
        acc = acc * y_near + 1 / math.factorial(k)
    return torch.where(near, -y_near * acc, 1 - exp_y)


def zero_count_terms(p, scale, theta, zi_logits, is_zero, likelihood: str):
    """Every entry's likelihood terms as if its count were 0, for mean mu = p * scale (p (B, G), scale (B, 1)).
    Returns (sum over the genes where is_zero of log p(0), (B,); d log p(0) / d log mu, (B, G); d / d theta,
    (B, G) or None; d / d zi_logits, (B, G) or None). The non-zero entries are overwritten afterwards.

    With m = mu / theta, L0 = log NB(0) = -theta log1p(m), v = -m / (1 + m), q = e^L0 and pi = sigmoid(z):
        NB    d/d log mu = theta v = -mu / (1 + m);  d/d theta = h(v), log1p(v) = -log1p(m) exactly
        ZINB  p(0) = P0 = pi + (1 - pi) q = 1 - u with u = (1 - pi)(1 - q); log P0 = log1p(-u) for u <= 1/2 (as
              log(1 - u) u / (1 - (1 - u)), Kahan's form of log1p, exact because 1 - u rounds to [1/2, 1]), else
              log P0 of the sum of two non-negative terms, clamped at the smallest normal number (both terms
              underflow only for z < -87 and L0 < -87 in float32); the NB gradients scale by r = (1 - pi) q / P0,
              the share of NB(0) in p(0), and d/dz = (1 - q) (1 - r) (1 - pi), with 1 - r = pi / P0.
    Transcendentals per entry: log1p(m); ZINB adds e^L0, e^-|z| and one log. sigmoid(z) and 1 - sigmoid(z) both come
    from t = e^-|z| (1 / (1 + t) and t / (1 + t)), so neither is a difference of numbers near 1.
    """
    mu = p * scale
    if likelihood == "poisson":
        return torch.where(is_zero, -mu, 0.0).sum(-1), -mu, None, None
    m = mu / theta
    log1p_m = torch.log1p(m)
    inv_one_plus_m = 1 / (1 + m)
    v = -m * inv_one_plus_m
    d_log_mu = -mu * inv_one_plus_m
    near = m < 1  # |v| < H_SERIES_MAX = 1/2
    d_theta = torch.where(near, h_series(torch.where(near, v, 0.0)), -log1p_m - v)
    log_nb_zero = -theta * log1p_m
    if likelihood == "nb":
        return torch.where(is_zero, log_nb_zero, 0.0).sum(-1), d_log_mu, d_theta, None
    q = torch.exp(log_nb_zero)
    one_minus_q = one_minus_exp(log_nb_zero, q)
    t = torch.exp(-zi_logits.abs())
    sigmoid_abs = 1 / (1 + t)
    positive = zi_logits >= 0
    pi = torch.where(positive, sigmoid_abs, t * sigmoid_abs)
    one_minus_pi = torch.where(positive, t * sigmoid_abs, sigmoid_abs)
    u = one_minus_pi * one_minus_q
    p_zero = (pi + one_minus_pi * q).clamp(min=torch.finfo(p.dtype).tiny)
    inv_p_zero = 1 / p_zero
    small_u = u <= 0.5
    w = torch.where(small_u, 1 - u, p_zero)
    log_w = torch.log(w)
    log_p_zero = torch.where(small_u, torch.where(w == 1, -u, log_w * (u / (1 - w))), log_w)
    nb_share = one_minus_pi * q * inv_p_zero
    d_zi = one_minus_q * pi * inv_p_zero * one_minus_pi
    return torch.where(is_zero, log_p_zero, 0.0).sum(-1), nb_share * d_log_mu, nb_share * d_theta, d_zi


def nonzero_count_terms(x, mu, theta, zi_logits, stirlerr_x, stirlerr_theta, likelihood: str):
    """The likelihood terms of the non-zero counts, on 1-D gathers of them: x, mu, theta and zi_logits (or None), with
    stirlerr(x) and stirlerr(theta). Returns (log p(x), d log p / d log mu, d / d theta or None, d / d zi_logits or
    None).

    NB: d/d log mu = theta v with v = (x - mu) / (theta + mu), d/d theta = h(v) + E(x, theta) (module docstring);
    ZINB adds log(1 - pi) = -softplus(z) to log p and has d/dz = -sigmoid(z)."""
    if likelihood == "poisson":
        return log_poisson_positive(x, mu, stirlerr_x), x - mu, None, None
    theta_plus_mu = theta + mu
    v = (x - mu) / theta_plus_mu
    d_theta = log1p_minus_identity(v, (theta + x) / theta_plus_mu) + digamma_difference_remainder(x, theta)
    log_p = log_nb_positive(x, mu, theta, stirlerr_x, stirlerr_theta)
    if likelihood == "nb":
        return log_p, theta * v, d_theta, None
    return log_p - F.softplus(zi_logits), theta * v, d_theta, -torch.sigmoid(zi_logits)


def all_terms(rows, cols, values, p, scale, theta, zi_logits, is_zero, likelihood: str, integer_counts: bool):
    """zero_count_terms over every entry, and nonzero_count_terms at the entries (rows, cols, values) that may be
    non-zero, gathered here so that torch.compile fuses the gathers into its loops. Returns zero_count_terms' four
    results and, at those entries, nonzero_count_terms' four (the dense ones where a value is 0, log p 0: it is in
    the dense sum). integer_counts: every value is an integer (stirlerr from a table)."""
    flat = rows * p.shape[1] + cols
    dense = zero_count_terms(p, scale, theta, zi_logits, is_zero, likelihood)
    positive = values > 0  # a CSR tensor may store zeros: their terms stay the dense ones
    x = torch.where(positive, values, 1.0)
    stirlerr_x = stirlerr_of_counts(x) if integer_counts else stirlerr(x)
    theta_nz = stirlerr_theta_nz = None
    if theta is not None:
        at_nonzeros = (lambda t: t[cols]) if theta.dim() == 1 else (lambda t: t.reshape(-1)[flat])
        theta_nz, stirlerr_theta_nz = at_nonzeros(theta), at_nonzeros(stirlerr(theta))
    zi_nz = None if zi_logits is None else zi_logits.reshape(-1)[flat]
    mu_nz = p.reshape(-1)[flat] * scale.reshape(-1)[rows]
    log_p, *gradients = nonzero_count_terms(x, mu_nz, theta_nz, zi_nz, stirlerr_x, stirlerr_theta_nz, likelihood)
    gradients = [
        None if g is None else torch.where(positive, g, d.reshape(-1)[flat]) for g, d in zip(gradients, dense[1:])
    ]
    return dense, (torch.where(positive, log_p, 0.0), *gradients)


# torch.compile fuses all_terms into two loops, one over every entry and one over the non-zeros (eager PyTorch would
# make a B x G temporary per operation); see benchmarks/kernels.py for the gain. It needs a C++ toolchain (dropped for
# eager if it fails) and costs tens of seconds once (then cached on disk), so it runs from COMPILE_MIN_ENTRIES entries
# on: 16 cells x 2,048 genes, so that a small store's 50-cell validation minibatch runs compiled too (eager, it
# weighed on each of scvi-tools' 400 epochs: benchmarks/history/issue-16.md), and never where a size is 0 or 1
# (torch.compile specialises those and would compile again). The choice depends on the input's sizes alone, never on
# what ran before in the process: the same seed gives the same model in a fresh process and after other work.
COMPILE_MIN_ENTRIES = 1 << 15
_compiled: dict = {}


def _maybe_compiled(function, n_entries: int, smallest_size: int):
    """`function` compiled by torch.compile (shapes dynamic) for inputs of n_entries >= COMPILE_MIN_ENTRIES whose
    sizes are all 2 or more (smallest_size); else `function` itself."""
    if n_entries < COMPILE_MIN_ENTRIES or smallest_size < 2 or _compiled.get(function, True) is None:
        return function
    if function not in _compiled:
        # inductor's own default cache is under /tmp (per user, gone at reboot): keep its builds beside the C
        # kernel's in the user's cache directory, unless the user chose a place
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(native_kernel.cache_dir() / "inductor"))
        _compiled[function] = torch.compile(function, dynamic=True)
    compiled = _compiled[function]

    def run(*args):
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager function computes the same
            logger.warning(
                "torch.compile of %s failed (%s: %s); running it eagerly from now on",
                function.__name__,
                type(error).__name__,
                error,
            )
            _compiled[function] = None
            return function(*args)

    return run


def native_ready() -> bool:
    """Whether the C kernel (native.py) is built, loaded and agrees with this module's terms on a check input
    (counts 0..1e4, mu 1e-3..1e4, theta 1e-3..1e3, logits +-20, each likelihood; checked once per process)."""
    if native_kernel.library() is None:
        return False
    if not native_kernel._state.get("checked"):
        native_kernel._state["checked"] = True
        mismatch = _native_mismatch()
        if mismatch:
            native_kernel.disable(mismatch)
    return native_kernel.library() is not None


def _native_mismatch() -> str | None:
    """What of the C kernel's terms disagrees with count_terms' own on a small input, or None."""
    generator = torch.Generator().manual_seed(0)
    n_cells, n_genes = 4, 64
    mu = 10 ** (torch.rand(n_cells, n_genes, generator=generator) * 7 - 3)
    x = torch.poisson(mu, generator=generator).clamp(max=1e4)
    theta = 10 ** (torch.rand(n_genes, generator=generator) * 6 - 3)
    zi = torch.randn(n_cells, n_genes, generator=generator) * 20
    ones = torch.ones(n_cells, 1)
    for likelihood in LIKELIHOODS:
        inputs = (mu, ones, None if likelihood == "poisson" else theta, zi if likelihood == "zinb" else None)
        got = count_terms(x, *inputs, likelihood, native=True)
        want = count_terms(x, *inputs, likelihood, native=False)
        for name, a, b in zip(("log p", "d log mu", "d theta", "d zi"), got, want):
            if (a is None) != (b is None):
                return f"{likelihood} {name}: present in one path only"
            if a is not None and not torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-4):
                return f"{likelihood} {name}: largest difference {float((a - b).abs().max()):.3g}"
    return None


def nonzero_entries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of the entries of x, (B, G) dense or sparse CSR, that may be non-zero; each (nnz,): a
    dense x's non-zeros, a CSR tensor's stored entries (explicit zeros among them are handled by count_terms, so
    that no value is read back to the host here)."""
    if x.layout == torch.sparse_csr:
        crow = x.crow_indices()
        rows = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), crow[1:] - crow[:-1])
        # values() is a view whose base is the sparse tensor, which torch.compile's guards cannot describe (2.13):
        # a copy of the nnz values keeps the compiled path
        return rows, x.col_indices(), x.values().clone()
    rows, cols = x.nonzero(as_tuple=True)
    return rows, cols, x[rows, cols]


def count_terms(x, p, scale, theta, zi_logits, likelihood: str, native: bool):
    """The per-cell log-likelihood (B,) and the per-entry gradients d log p / d log mu, d / d theta, d / dz
    ((B, G) each, or None), for counts x (B, G), dense or sparse CSR, and the mean mu = p * scale (p (B, G),
    scale (B, 1)). native: the C kernel computes them (native.py; float32 CPU tensors), reading a CSR x's own
    row pointers; else all_terms at x's entries that may be non-zero, then their terms written over the dense
    ones."""
    if native:
        if x.layout == torch.sparse_csr:
            crow, cols, values = x.crow_indices().long(), x.col_indices().long(), x.values()
        else:
            rows, cols, values = nonzero_entries(x)
            crow = torch.zeros(p.shape[0] + 1, dtype=torch.int64)
            torch.cumsum(torch.bincount(rows, minlength=p.shape[0]), 0, out=crow[1:])
        return native_kernel.count_terms(crow, cols, values, p, scale, theta, zi_logits, likelihood)
    rows, cols, values = nonzero_entries(x)
    flat = rows * p.shape[1] + cols
    # (scatter_: faster than index_put_ for these 1-D writes)
    is_zero = torch.ones(p.shape, dtype=torch.bool, device=p.device)
    is_zero.view(-1).scatter_(0, flat, values == 0)
    # Integer counts take stirlerr from a table. Finding out reads a value back to the host, which costs a device
    # sync on a GPU only: there the general form runs.
    integer_counts = values.device.type == "cpu" and torch.equal(values, torch.round(values))
    # Detached: torch.compile guards on requires_grad, so training and validation would compile twice.
    p, scale, theta, zi_logits = (None if t is None else t.detach() for t in (p, scale, theta, zi_logits))
    (per_cell, *dense), (log_p_nz, *sparse) = _maybe_compiled(all_terms, p.numel(), min(*p.shape, values.numel()))(
        rows, cols, values, p, scale, theta, zi_logits, is_zero, likelihood, integer_counts
    )
    for gradient, at_nonzeros in zip(dense, sparse):
        if gradient is not None:
            gradient.view(-1).scatter_(0, flat, at_nonzeros)
    return (per_cell.index_add(0, rows, log_p_nz), *dense)


def _per_gene_or_cell(grad_per_cell: torch.Tensor, per_entry: torch.Tensor, per_gene: bool) -> torch.Tensor:
    """sum over cells of grad_per_cell[:, None] * per_entry (G,) for a per-gene input, else the product (B, G)."""
    return grad_per_cell @ per_entry if per_gene else per_entry * grad_per_cell[:, None]


class CountLogLikelihood(torch.autograd.Function):
    """Per-cell sum of log p(x) (B,), with the gradients of the module docstring computed in the forward pass and
    kept (B x G each, only those needed); the backward scales them by the incoming per-cell gradient."""

    @staticmethod
    def forward(ctx, x, mu, theta, zi_logits, likelihood: str, native: bool):
        scale = torch.ones(mu.shape[0], 1, dtype=mu.dtype, device=mu.device)
        per_cell, d_log_mu, d_theta, d_zi = count_terms(x, mu, scale, theta, zi_logits, likelihood, native)
        ctx.theta_per_gene = theta is not None and theta.dim() == 1
        d_mu = d_log_mu / mu if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(
            d_mu, d_theta if ctx.needs_input_grad[2] else None, d_zi if ctx.needs_input_grad[3] else None
        )
        return per_cell

    @staticmethod
    def backward(ctx, grad_per_cell):
        d_mu, d_theta, d_zi = ctx.saved_tensors
        scale = grad_per_cell[:, None]
        grad_mu = None if d_mu is None else d_mu * scale
        grad_zi = None if d_zi is None else d_zi * scale
        grad_theta = None if d_theta is None else _per_gene_or_cell(grad_per_cell, d_theta, ctx.theta_per_gene)
        return None, grad_mu, grad_theta, grad_zi, None, None


def count_log_likelihood(x, mu, theta, zi_logits, likelihood: str, native: bool = False) -> torch.Tensor:
    """PyTorch path of `scvi_scale.kernels.count_log_likelihood` (see there); native: its terms from the C kernel.
    Returns (B,)."""
    return CountLogLikelihood.apply(x, mu, theta, zi_logits, likelihood, native)


class DecoderLogLikelihood(torch.autograd.Function):
    """Per-cell log p(x) (B,) from the decoder's last hidden layer, its heads and the log library, with one B x G
    product per head forward and two backward, and no B x G elementwise work in the backward.

    Forward: s = hidden W^T + b, p = softmax(s), mu = exp(l) p, z = hidden Wd^T + bd; count_terms gives
    a = d log p / d log mu, d / d theta and dZ = d / dz per entry; with A = sum_genes a, the gradient of a cell's
    log-likelihood in s is dS = a - p A (the softmax's Jacobian) and in l it is A. dS, dZ and d / d theta are kept.
    Backward, for incoming per-cell gradients g: d hidden = g (dS W + dZ Wd), dW = dS^T (g hidden), db = g dS (a
    (B,) @ (B, G) product), likewise for the dropout head; dl = g A; d theta = g @ d/d theta (per gene).
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        scale_weight,
        scale_bias,
        log_library,
        x,
        theta,
        dropout_weight,
        dropout_bias,
        likelihood: str,
        native: bool,
    ):
        p = torch.softmax(F.linear(hidden, scale_weight, scale_bias), dim=-1)
        zi_logits = F.linear(hidden, dropout_weight, dropout_bias) if likelihood == "zinb" else None
        scale = torch.exp(log_library)[:, None]
        per_cell, d_s, d_theta, d_zi = count_terms(x, p, scale, theta, zi_logits, likelihood, native)
        per_cell_a = d_s.sum(-1)
        d_s.addcmul_(p, per_cell_a[:, None], value=-1)  # a - p A, in place
        ctx.likelihood = likelihood
        ctx.theta_per_gene = theta is not None and theta.dim() == 1
        ctx.save_for_backward(
            hidden, scale_weight, dropout_weight, d_s, d_zi, per_cell_a, d_theta if ctx.needs_input_grad[5] else None
        )
        return per_cell

    @staticmethod
    def backward(ctx, grad_per_cell):
        hidden, scale_weight, dropout_weight, d_s, d_zi, per_cell_a, d_theta = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g = grad_per_cell[:, None]
        grad_hidden = grad_w = grad_b = grad_l = grad_theta = grad_wd = grad_bd = None
        if needs[0]:
            grad_hidden = d_s @ scale_weight
            if d_zi is not None:
                grad_hidden = grad_hidden.addmm_(d_zi, dropout_weight)
            grad_hidden = grad_hidden.mul_(g)
        weighted_hidden = hidden * g if needs[1] or needs[6] else None
        if needs[1]:
            grad_w = d_s.t() @ weighted_hidden
        if needs[2]:
            grad_b = grad_per_cell @ d_s
        if needs[3]:
            grad_l = grad_per_cell * per_cell_a
        if d_theta is not None:
            grad_theta = _per_gene_or_cell(grad_per_cell, d_theta, ctx.theta_per_gene)
        if d_zi is not None:
            if needs[6]:
                grad_wd = d_zi.t() @ weighted_hidden
            if needs[7]:
                grad_bd = grad_per_cell @ d_zi
        return grad_hidden, grad_w, grad_b, grad_l, None, grad_theta, grad_wd, grad_bd, None, None


def decoder_log_likelihood(
    hidden,
    scale_weight,
    scale_bias,
    log_library,
    x,
    theta,
    dropout_weight,
    dropout_bias,
    likelihood: str,
    native: bool = False,
) -> torch.Tensor:
    """PyTorch path of `scvi_scale.kernels.decoder_log_likelihood` (see there); native: its terms from the C
    kernel. Returns (B,)."""
    return DecoderLogLikelihood.apply(
        hidden, scale_weight, scale_bias, log_library, x, theta, dropout_weight, dropout_bias, likelihood, native
    )


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
