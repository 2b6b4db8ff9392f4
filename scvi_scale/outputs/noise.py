"""Random numbers keyed by cell, and counts drawn from NB / Poisson by inverting their CDF with those numbers.

Every random number an output uses comes from a counter-based generator (Philox, Salmon et al. 2011) whose key is
derived from the seed and whose counter starts at (stream, cell key): a pure function of (seed, stream, cell key,
position in the cell's sequence). So a cell's draws do not depend on which other cells share its chunk or
minibatch, on the chunk size, on the process that computes it, or on whether the run was resumed.

    noise = CellNoise(seed, keys)               # keys (B,): store rows, or request numbers
    noise.normal(stream, (n_draws, n_latent))   # (B, n_draws, n_latent) float32 standard normals
    noise.uniform(stream, n_genes)              # (B, n_genes) float32 in [0, 1)

Moving one Philox generator to a cell's counter costs about 2 microseconds, measured cheaper than hashing counters
in numpy for the (cells x genes) uniforms of posterior sampling.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy import special


MAX_WALK = 64  # CDF steps taken one by one; entries beyond are bisected (heavy NB tails take thousands of steps)


class CellNoise:
    """Uniform and normal draws keyed by (seed, stream, cell key); see the module docstring. Not thread-safe: one
    instance per thread."""

    def __init__(self, seed: int, keys: np.ndarray):
        self.seed = int(seed)
        self.keys = np.asarray(keys, dtype=np.int64)
        self._bits = np.random.Philox(key=np.random.SeedSequence(self.seed).generate_state(2, np.uint64))
        self._generator = np.random.Generator(self._bits)

    def subset(self, positions) -> CellNoise:
        return CellNoise(self.seed, self.keys[positions])

    def _cells(self, stream: int):
        """Yield each cell's row index with the generator moved to the start of that cell's sequence."""
        state = self._bits.state
        for row, key in enumerate(self.keys):
            state["state"]["counter"] = np.array([0, 0, stream, key], dtype=np.uint64)
            state["buffer_pos"] = len(state["buffer"])  # nothing buffered from the previous cell
            state["has_uint32"] = 0
            self._bits.state = state
            yield row

    def uniform(self, stream: int, size: int) -> np.ndarray:
        """(B, size) float32 uniforms in [0, 1): the first `size` of each cell's sequence in this stream."""
        values = np.empty((len(self.keys), size), dtype=np.float32)
        for row in self._cells(stream):
            self._generator.random(out=values[row], dtype=np.float32)
        return values

    def normal(self, stream: int, shape: tuple[int, ...]) -> np.ndarray:
        """(B, *shape) float32 standard normals: the first prod(shape) of each cell's sequence in this stream."""
        values = np.empty((len(self.keys), int(np.prod(shape))), dtype=np.float32)
        for row in self._cells(stream):
            self._generator.standard_normal(out=values[row], dtype=np.float32)
        return values.reshape(len(self.keys), *shape)


def invert_counts(
    uniform: np.ndarray, mean: torch.Tensor, theta: torch.Tensor | None = None, dropout: torch.Tensor | None = None
) -> sp.csr_matrix:
    """Counts (B, G) as float32 CSR, one uniform in [0, 1) per entry, by inverting the CDF of the likelihood.

    theta None: Poisson(mean), pmf(0) = exp(-mean), pmf(k + 1) = pmf(k) mean / (k + 1). Else negative binomial
    with inverse dispersion theta ((G,) or (B, G)), pmf(0) = (theta / (theta + mean))^theta, pmf(k + 1) = pmf(k)
    (k + theta) / (k + 1) * mean / (theta + mean). dropout (B, G): zero-inflation probabilities; u < dropout is a
    structural zero, and otherwise (u - dropout) / (1 - dropout), uniform on [0, 1), is inverted.

    The entries below the zero threshold, about 90% of them, are settled in a few float32 tensor operations; the
    others walk up the CDF together in float64, each stopping at the first k whose CDF exceeds its uniform; the
    few still walking after MAX_WALK steps are bisected on the CDF (`_bisect_counts`). Exact up to the uniforms'
    24-bit resolution and float64 rounding.
    uniform: numpy float32 (B, G); mean, theta, dropout: float32 tensors (or arrays) on the CPU.
    """
    uniform = torch.as_tensor(uniform)
    mean = torch.as_tensor(mean, dtype=torch.float32)
    n_rows, n_genes = mean.shape
    if theta is not None:
        theta = torch.as_tensor(theta, dtype=torch.float32).expand_as(mean)
        zero_probability = torch.exp(-theta * torch.log1p(mean / theta))
    else:
        zero_probability = torch.exp(-mean)
    threshold = zero_probability
    if dropout is not None:
        dropout = torch.as_tensor(dropout, dtype=torch.float32)
        threshold = dropout + (1 - dropout) * zero_probability
    positions = torch.nonzero((uniform >= threshold).reshape(-1)).reshape(-1)  # row-major: sorted CSR

    def entries(values: torch.Tensor) -> np.ndarray:
        return values.reshape(-1)[positions].double().numpy()

    entry_uniform, entry_mean = entries(uniform), entries(mean)
    if dropout is not None:
        entry_dropout = entries(dropout)
        entry_uniform = (entry_uniform - entry_dropout) / (1.0 - entry_dropout)
    # pmf(k + 1) = pmf(k) (slope k + intercept) / (k + 1): Poisson slope 0, intercept mean; NB slope
    # mean / (theta + mean), intercept theta times that.
    if theta is None:
        entry_theta, slope, intercept = None, np.zeros_like(entry_mean), entry_mean
        pmf = np.exp(-entry_mean)
    else:
        entry_theta = entries(theta)
        slope = entry_mean / (entry_theta + entry_mean)
        intercept = entry_theta * slope
        pmf = np.exp(-entry_theta * np.log1p(entry_mean / entry_theta))
    cdf = pmf.copy()
    values = np.ones(len(positions), dtype=np.float32)  # every entry here is at least 1
    # walking[i]: the entry (of all `positions`) followed in slot i; values grow by 1 per step the CDF stays at
    # or below the uniform. Finished entries keep their value; the arrays shrink when half of them are finished.
    walking = np.arange(len(positions))
    counts = values.copy()
    below = np.ones(len(positions), dtype=bool)
    for k in range(MAX_WALK):
        pmf *= (slope * k + intercept) / (k + 1)
        cdf += pmf
        np.less_equal(cdf, entry_uniform, out=below)
        counts += below
        n_below = np.count_nonzero(below)
        if n_below == 0 or 2 * n_below < len(walking):
            values[walking] = counts
            walking, pmf, cdf, entry_uniform, slope, intercept, counts, entry_mean = (
                array[below] for array in (walking, pmf, cdf, entry_uniform, slope, intercept, counts, entry_mean)
            )
            if entry_theta is not None:
                entry_theta = entry_theta[below]
            below = below[below]
            if n_below == 0:
                break
    values[walking] = counts
    if below.any():  # the few still below after MAX_WALK steps, far in a heavy tail: bisect on the CDF itself
        values[walking[below]] = _bisect_counts(
            entry_uniform[below], entry_mean[below], None if entry_theta is None else entry_theta[below], MAX_WALK
        )
    rows, columns = np.divmod(positions.numpy(), n_genes)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return sp.csr_matrix((values, columns.astype(np.int32), indptr), shape=(n_rows, n_genes))


def _cdf(k: np.ndarray, mean: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
    """P(X <= k): Poisson, Q(k + 1, mean); negative binomial, I_p(theta, k + 1) with p = theta / (theta + mean)."""
    if theta is None:
        return special.gammaincc(k + 1, mean)
    return special.betainc(theta, k + 1, theta / (theta + mean))


def _bisect_counts(uniform: np.ndarray, mean: np.ndarray, theta: np.ndarray | None, low: int) -> np.ndarray:
    """The smallest k > low with CDF(k) > uniform, for entries known to have CDF(low) <= uniform."""
    low = np.full(len(uniform), float(low))
    high = 2 * low
    while True:  # double the upper end until it holds every quantile
        short = _cdf(high, mean, theta) <= uniform
        if not short.any():
            break
        low, high = np.where(short, high, low), np.where(short, 2 * high, high)
    while np.any(high - low > 1):  # invariant: CDF(low) <= u < CDF(high)
        middle = np.floor((low + high) / 2)
        below = _cdf(middle, mean, theta) <= uniform
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return high.astype(np.float32)
