"""Special functions and the per-entry count likelihood in Triton, written from `tl` primitives only.

`tl.math` has no log1p, expm1, lgamma or digamma, and libdevice calls fail under TRITON_INTERPRET=1, so everything
here is built from tl.exp, tl.log, arithmetic and tl.where, and the same code runs on the GPU and in the interpreter
tests. The formulas, their accuracy and why each form is chosen are in torch_ops.py's docstrings; each function
below names its PyTorch counterpart there. All functions are elementwise on blocks of any shape, in the dtype of
their inputs (float32, or float64 for gradcheck), and are evaluated on both sides of every tl.where, so the side
not taken is fed inputs that keep it finite.

Likelihood codes (constexpr): ZINB = 0, NB = 1, POISSON = 2.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

ZINB: tl.constexpr = tl.constexpr(0)
NB: tl.constexpr = tl.constexpr(1)
POISSON: tl.constexpr = tl.constexpr(2)
LIKELIHOOD_CODES = {"zinb": 0, "nb": 1, "poisson": 2}

LOG_2PI: tl.constexpr = tl.constexpr(math.log(2 * math.pi))
STIRLING_MIN: tl.constexpr = tl.constexpr(8.0)  # torch_ops.STIRLING_MIN
BD0_SERIES_MAX: tl.constexpr = tl.constexpr(0.1)  # torch_ops.BD0_SERIES_MAX
H_SERIES_MAX: tl.constexpr = tl.constexpr(0.5)  # torch_ops.H_SERIES_MAX


@triton.jit
def log1p(x):
    """log(1 + x) for x >= -1: log(u) * x / (u - 1) with u = 1 + x cancels the rounding of u (Goldberg 1991)."""
    u = 1.0 + x
    u_minus_one = u - 1.0
    exact = u_minus_one == 0.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u_minus_one)))


@triton.jit
def expm1(x):
    """exp(x) - 1: (u - 1) * x / log(u) with u = exp(x) cancels the rounding of u (Kahan)."""
    u = tl.exp(x)
    u_minus_one = u - 1.0
    tiny = u_minus_one == 0.0
    saturated = (u_minus_one == -1.0) | (u == float("inf"))
    ratio = u_minus_one * (x / tl.log(tl.where(tiny | saturated, 2.0, u)))
    return tl.where(tiny, x, tl.where(saturated, u_minus_one, ratio))


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow."""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)), accurate in relative terms on both tails."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def logaddexp(a, b):
    top = tl.maximum(a, b)
    return top + log1p(tl.exp(-tl.abs(a - b)))


@triton.jit
def stirling_correction(z):
    """torch_ops.stirling_correction: lgamma(z) - (z - 1/2) log z + z - log(2 pi)/2, for z >= STIRLING_MIN."""
    r = 1.0 / z
    r2 = r * r
    return r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 * (1 / 1680 - r2 / 1188))))


@triton.jit
def stirling_correction_derivative(z):
    """torch_ops.stirling_correction_derivative, for z >= STIRLING_MIN."""
    r2 = 1.0 / (z * z)
    return -r2 * (1 / 12 - r2 * (1 / 120 - r2 * (1 / 252 - r2 * (1 / 240 - r2 / 132))))


@triton.jit
def odd_series(t):
    """torch_ops.odd_series: 1/3 + t/5 + t^2/7 + ..., Horner, for 0 <= t <= 1/9: 17 terms in float64, 8 else."""
    if t.dtype == tl.float64:
        acc = t * 0.0 + 1.0 / 35.0
        for k in tl.static_range(1, 17):
            acc = acc * t + 1.0 / (35.0 - 2.0 * k)
    else:
        acc = t * 0.0 + 1.0 / 17.0
        for k in tl.static_range(1, 8):
            acc = acc * t + 1.0 / (17.0 - 2.0 * k)
    return acc


@triton.jit
def stirlerr(z):
    """torch_ops.stirlerr: lgamma(z + 1) - (z + 1/2) log z + z - log(2 pi)/2 for z > 0.

    Below STIRLING_MIN the recursion stirlerr(y) = stirlerr(y + 1) + (y + 1/2) log1p(1/y) - 1 climbs 8 steps to the
    series: each step is small and accurate, where lgamma(z + 1) - (z + 1/2) log z would cancel."""
    large = stirling_correction(tl.maximum(z, STIRLING_MIN))
    y = tl.minimum(z, STIRLING_MIN)
    climbed = stirling_correction(y + STIRLING_MIN)
    for k in tl.static_range(8):
        climbed += (y + k + 0.5) * log1p(1.0 / (y + k)) - 1.0
    return tl.where(z >= STIRLING_MIN, large, climbed)


@triton.jit
def bd0(a, b):
    """torch_ops.bd0: a log(a / b) + b - a >= 0 for a, b > 0 (Loader's series near a = b)."""
    v = (a - b) / (a + b)
    near = tl.abs(v) < BD0_SERIES_MAX
    v_near = tl.where(near, v, 0.0)
    series = (a - b) * v_near + 2.0 * a * v_near * v_near * v_near * odd_series(v_near * v_near)
    return tl.where(near, series, a * tl.log(a / b) + b - a)


@triton.jit
def log1p_minus_identity(v, one_plus_v):
    """torch_ops.log1p_minus_identity: log1p(v) - v for v > -1, given v and 1 + v each without cancellation."""
    near = tl.abs(v) < H_SERIES_MAX
    v_near = tl.where(near, v, 0.0)
    w = v_near / (2.0 + v_near)
    series = -v_near * w + 2.0 * w * w * w * odd_series(w * w)
    return tl.where(near, series, tl.log(one_plus_v) - v)


@triton.jit
def digamma_difference_remainder(x, theta):
    """torch_ops.digamma_difference_remainder: digamma(x + theta) - digamma(theta) - log1p(x / theta), x >= 0."""
    large_theta = theta >= STIRLING_MIN
    t = tl.where(large_theta, theta, theta + STIRLING_MIN)
    remainder = x / (2.0 * t * (x + t)) + stirling_correction_derivative(x + t) - stirling_correction_derivative(t)
    shift = x * 0.0
    for k in tl.static_range(8):
        shift += x / ((theta + k) * (x + theta + k))
    q = STIRLING_MIN * x / ((theta + STIRLING_MIN) * (theta + x))
    log_one_minus_q = tl.where(
        q < 0.5,
        log1p(-tl.minimum(q, 0.5)),
        tl.log(theta * (theta + STIRLING_MIN + x) / ((theta + STIRLING_MIN) * (theta + x))),
    )
    return tl.where(large_theta, remainder, remainder + shift + log_one_minus_q)


@triton.jit
def log_nb_positive(x, mu, theta):
    """torch_ops.log_nb_positive: log NB(x; mu, theta) for x > 0."""
    trials = x + theta
    return (
        stirlerr(trials)
        - stirlerr(theta)
        - stirlerr(x)
        - bd0(theta, theta * trials / (theta + mu))
        - bd0(x, mu * trials / (theta + mu))
        - 0.5 * (LOG_2PI + tl.log(x))
        - 0.5 * log1p(x / theta)
    )


@triton.jit
def count_log_prob(x, mu, theta, zi_logits, LIKELIHOOD: tl.constexpr):
    """log p(x) per entry (torch_ops' module docstring), for blocks of x >= 0, mu > 0, theta > 0 and zi_logits
    (ignored unless ZINB; theta ignored for POISSON)."""
    positive = x > 0
    x_pos = tl.where(positive, x, 1.0)
    if LIKELIHOOD == POISSON:
        log_p_positive = -stirlerr(x_pos) - bd0(x_pos, mu) - 0.5 * (LOG_2PI + tl.log(x_pos))
        return tl.where(positive, log_p_positive, -mu)
    else:
        log_nb_zero = -theta * log1p(mu / theta)
        log_nb = tl.where(positive, log_nb_positive(x_pos, mu, theta), log_nb_zero)
        if LIKELIHOOD == NB:
            return log_nb
        else:
            u = sigmoid(-zi_logits) * -expm1(log_nb_zero)
            small_u = u <= 0.5
            log_p_zero = tl.where(
                small_u,
                log1p(-tl.where(small_u, u, 0.0)),
                logaddexp(zi_logits, log_nb_zero) - softplus(zi_logits),
            )
            return tl.where(positive, log_nb - softplus(zi_logits), log_p_zero)


@triton.jit
def count_log_prob_grads(x, mu, theta, zi_logits, LIKELIHOOD: tl.constexpr):
    """(d log p / d log mu, d log p / d theta, d log p / d zi_logits) per entry (torch_ops' module docstring).

    The unused ones (theta for POISSON, zi_logits unless ZINB) come back as zeros."""
    if LIKELIHOOD == POISSON:
        zeros = x * 0.0
        return x - mu, zeros, zeros
    else:
        v = (x - mu) / (theta + mu)
        d_log_mu = theta * v
        d_theta = log1p_minus_identity(v, (theta + x) / (theta + mu)) + digamma_difference_remainder(x, theta)
        if LIKELIHOOD == NB:
            return d_log_mu, d_theta, x * 0.0
        else:
            positive = x > 0
            log_nb_zero = -theta * log1p(mu / theta)
            nb_share = tl.where(positive, 1.0, sigmoid(log_nb_zero - zi_logits))
            d_zi_zero = -expm1(log_nb_zero) * sigmoid(zi_logits - log_nb_zero) * sigmoid(-zi_logits)
            d_zi = tl.where(positive, -sigmoid(zi_logits), d_zi_zero)
            return d_log_mu * nb_share, d_theta * nb_share, d_zi
