"""Random numbers keyed by cell, and counts drawn from NB / Poisson by inverting their CDF with those numbers.

Every random number an output uses is a pure function of (seed, stream, cell key, position in the cell's sequence),
so a cell's draws do not depend on which other cells share its chunk or minibatch, on the chunk size, on the
process that computes it, or on whether the run was resumed. Two counter-based generators, each fast where the
other is slow:
- uniforms, one per gene (thousands per cell): Philox (Salmon et al. 2011) with its key derived from the seed and
  its counter moved to (stream, cell key); moving costs microseconds per cell, then values come at numpy's
  speed;
- normals, a few per cell (the latent's dimensions, the library): SplitMix64 (Steele et al. 2014) started at a hash of
  (seed, stream, cell key), computed for all cells at once in numpy, then Box-Muller; for a few normals per cell this
  is cheaper than moving Philox cell by cell (benchmarks/history/from-code.md). From LONG_NORMAL_SEQUENCE normals per
  cell (the 5000 draws of the "ln" latent mean, n_samples draws of the latent) Philox is cheaper again and makes them.

    noise = CellNoise(seed, keys)               # keys (B,): store rows, or request numbers
    noise.normal(stream, (n_draws, n_latent))   # (B, n_draws, n_latent) float32 standard normals
    noise.uniform(stream, n_genes)              # (B, n_genes) float32 in [0, 1)
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy import special

NOISE_VERSION = 2  # recorded with written outputs; raise it whenever a draw changes for the same (seed, cell)
MAX_WALK = 64  # CDF steps taken one by one; entries beyond are bisected (heavy NB tails take thousands of steps)
LONG_NORMAL_SEQUENCE = 128  # normals per cell from which Philox makes them (just above the measured crossover)
NORMAL_BLOCK_VALUES = 1 << 20  # normals made per block of cells: bounds the uint64 temporaries to a few MB
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio, odd)


def _mix64(bits: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Stafford's mix 13): a bijection of uint64 in which every input bit flips each
    output bit with probability about 1/2."""
    bits = (bits ^ (bits >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    bits = (bits ^ (bits >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return bits ^ (bits >> np.uint64(31))


class CellNoise:
    """Uniform and normal draws keyed by (seed, stream, cell key); see the module docstring. Not thread-safe: one
    instance per thread."""

    def __init__(self, seed: int, keys: np.ndarray):
        self.seed = int(seed)
        self.keys = np.asarray(keys, dtype=np.int64)
        self._seed_state = np.random.SeedSequence(self.seed).generate_state(2, np.uint64)
        self._bits = np.random.Philox(key=self._seed_state)
        self._generator = np.random.Generator(self._bits)

    def subset(self, positions) -> CellNoise:
        return CellNoise(self.seed, self.keys[positions])

    def _philox(self, stream: int, size: int, draw) -> np.ndarray:
        """(B, size) float32: for each cell, `draw` (a method of the generator) fills its row with the first `size`
        values of the cell's Philox sequence, the generator moved to counter (stream, cell key) first."""
        values = np.empty((len(self.keys), size), dtype=np.float32)
        state = self._bits.state
        for row, key in enumerate(self.keys):
            state["state"]["counter"] = np.array([0, 0, stream, key], dtype=np.uint64)
            state["buffer_pos"] = len(state["buffer"])  # nothing buffered from the previous cell
            state["has_uint32"] = 0
            self._bits.state = state
            draw(out=values[row], dtype=np.float32)
        return values

    def uniform(self, stream: int, size: int) -> np.ndarray:
        """(B, size) float32 uniforms in [0, 1): the first `size` of each cell's sequence in this stream."""
        return self._philox(stream, size, self._generator.random)

    def normal(self, stream: int, shape: tuple[int, ...]) -> np.ndarray:
        """(B, *shape) float32 standard normals: the first prod(shape) of each cell's normal sequence in this
        stream (a sequence of its own, not the uniforms')."""
        n_values = int(np.prod(shape))
        if n_values >= LONG_NORMAL_SEQUENCE:
            return self._philox(stream, n_values, self._generator.standard_normal).reshape(len(self.keys), *shape)
        n_pairs = (n_values + 1) // 2  # Box-Muller turns two uniforms into two normals
        values = np.empty((len(self.keys), 2 * n_pairs), dtype=np.float32)
        block = max(1, NORMAL_BLOCK_VALUES // (2 * n_pairs))
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as SplitMix64 means it to
            stream_start = _mix64(self._seed_state[1] ^ _mix64(np.uint64(stream) + self._seed_state[0]))
            steps = _GOLDEN_GAMMA * np.arange(1, 2 * n_pairs + 1, dtype=np.uint64)
            for start in range(0, len(self.keys), block):
                cell_starts = _mix64(stream_start ^ _mix64(self.keys[start : start + block].astype(np.uint64)))
                bits = _mix64(cell_starts[:, None] + steps)  # (cells, 2 * n_pairs): SplitMix64's sequence
                uniforms = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 random bits in [0, 1)
                radius = np.sqrt(-2.0 * np.log1p(-uniforms[:, :n_pairs]))  # 1 - u lies in (0, 1]
                angle = 2.0 * np.pi * uniforms[:, n_pairs:]
                values[start : start + block, :n_pairs] = radius * np.cos(angle)
                values[start : start + block, n_pairs:] = radius * np.sin(angle)
        return values[:, :n_values].reshape(len(self.keys), *shape)


def invert_counts(
    uniform: np.ndarray | torch.Tensor,
    mean: torch.Tensor,
    theta: torch.Tensor | None = None,
    dropout: torch.Tensor | None = None,
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
    values = _nonzero_counts(entry_uniform, entry_mean, None if theta is None else entries(theta))
    rows, columns = np.divmod(positions.numpy(), n_genes)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return sp.csr_matrix((values, columns.astype(np.int32), indptr), shape=(n_rows, n_genes))


def _nonzero_counts(entry_uniform: np.ndarray, entry_mean: np.ndarray, entry_theta: np.ndarray | None) -> np.ndarray:
    """The counts (float32, each at least 1) of entries whose uniform is above the zero threshold: float64 uniforms
    (for zero inflation, already rescaled past the dropout), means and inverse dispersions (None: Poisson), one per
    entry. They walk up the CDF together for at most MAX_WALK steps; those left are bisected (`_bisect_counts`)."""
    # pmf(k + 1) = pmf(k) (slope k + intercept) / (k + 1): Poisson slope 0, intercept mean; NB slope
    # mean / (theta + mean), intercept theta times that.
    if entry_theta is None:
        slope, intercept = np.zeros_like(entry_mean), entry_mean
        pmf = np.exp(-entry_mean)
    else:
        slope = entry_mean / (entry_theta + entry_mean)
        intercept = entry_theta * slope
        pmf = np.exp(-entry_theta * np.log1p(entry_mean / entry_theta))
    cdf = pmf.copy()
    numerator = intercept.copy()  # slope k + intercept at step k
    values = np.ones(len(entry_uniform), dtype=np.float32)  # every entry here is at least 1
    # walking[i]: the entry followed in slot i; counts grow by 1 per step the CDF stays at or below the uniform.
    # Finished entries keep their value; the arrays shrink when a quarter or fewer still walk (in place otherwise:
    # the walk is bound by memory traffic, and most entries stop at 1 or 2).
    walking = np.arange(len(entry_uniform))
    counts = values.copy()
    below = np.ones(len(entry_uniform), dtype=bool)
    for k in range(MAX_WALK):
        pmf *= numerator
        pmf *= 1.0 / (k + 1)
        numerator += slope
        cdf += pmf
        np.less_equal(cdf, entry_uniform, out=below)
        counts += below
        n_below = np.count_nonzero(below)
        if n_below == 0 or 4 * n_below < len(walking):
            values[walking] = counts
            kept = np.flatnonzero(below)
            walking, pmf, cdf, entry_uniform, slope, numerator, counts = (
                array[kept] for array in (walking, pmf, cdf, entry_uniform, slope, numerator, counts)
            )
            below = np.ones(len(kept), dtype=bool)
            if n_below == 0:
                break
    values[walking] = counts
    if below.any():  # the few still below after MAX_WALK steps, far in a heavy tail: bisect on the CDF itself
        tail = walking[below]
        values[tail] = _bisect_counts(
            entry_uniform[below], entry_mean[tail], None if entry_theta is None else entry_theta[tail], MAX_WALK
        )
    return values


def _cdf(k: np.ndarray, mean: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
    """P(X <= k): Poisson, Q(k + 1, mean); negative binomial, I_p(theta, k + 1) with p = theta / (theta + mean)."""
    if theta is None:
        return special.gammaincc(k + 1, mean)
    return special.betainc(theta, k + 1, theta / (theta + mean))


def _bisect_counts(
    uniform: np.ndarray, mean: np.ndarray, theta: np.ndarray | None, low: int | np.ndarray
) -> np.ndarray:
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
