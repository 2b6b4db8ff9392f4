"""Random numbers keyed by cell, and counts drawn from NB / Poisson by inverting their CDF with those numbers.

Every random number an output uses comes from a counter-based generator (Philox, Salmon et al. 2011) whose key is
derived from the seed and whose counter starts at (stream, cell key): a pure function of (seed, stream, cell key,
position in the cell's sequence). So a cell's draws do not depend on which other cells share its chunk or
minibatch, on the chunk size, on the process that computes it, or on whether the run was resumed.

    noise = CellNoise(seed, keys)               # keys (B,): store rows, or request numbers
    noise.normal(stream, (n_draws, n_latent))   # (B, n_draws, n_latent) float32 standard normals
    noise.uniform(stream, n_genes)              # (B, n_genes) float64 in [0, 1)

One generator per cell and call costs a few microseconds, measured cheaper than hashing counters in numpy for
the (cells x genes) uniforms of posterior sampling.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class CellNoise:
    """Uniform and normal draws keyed by (seed, stream, cell key); see the module docstring."""

    def __init__(self, seed: int, keys: np.ndarray):
        self.seed = int(seed)
        self.keys = np.asarray(keys, dtype=np.int64)
        self._philox_key = np.random.SeedSequence(self.seed).generate_state(2, np.uint64)

    def subset(self, positions) -> CellNoise:
        return CellNoise(self.seed, self.keys[positions])

    def _generators(self, stream: int):
        for key in self.keys:
            counter = np.array([0, 0, stream, key], dtype=np.uint64)
            yield np.random.Generator(np.random.Philox(key=self._philox_key, counter=counter))

    def uniform(self, stream: int, size: int) -> np.ndarray:
        """(B, size) float64 uniforms in [0, 1): the first `size` of each cell's sequence in this stream."""
        values = np.empty((len(self.keys), size))
        for row, generator in enumerate(self._generators(stream)):
            generator.random(out=values[row])
        return values

    def normal(self, stream: int, shape: tuple[int, ...]) -> np.ndarray:
        """(B, *shape) float32 standard normals: the first prod(shape) of each cell's sequence in this stream."""
        values = np.empty((len(self.keys), int(np.prod(shape))), dtype=np.float32)
        for row, generator in enumerate(self._generators(stream)):
            generator.standard_normal(out=values[row], dtype=np.float32)
        return values.reshape(len(self.keys), *shape)


def invert_counts(uniform: np.ndarray, mean: np.ndarray, theta: np.ndarray | None = None) -> sp.csr_matrix:
    """Counts (B, G) as float32 CSR: for each entry the smallest k whose CDF exceeds its uniform (in [0, 1)).

    theta None: Poisson(mean), pmf(0) = exp(-mean), pmf(k + 1) = pmf(k) mean / (k + 1). Else negative binomial
    with inverse dispersion theta (broadcast against mean: (G,) or (B, G)), pmf(0) = (theta / (theta + mean))^theta,
    pmf(k + 1) = pmf(k) (k + theta) / (k + 1) * mean / (theta + mean). Entries with uniform < pmf(0), most of
    them, are zeros settled in a few vector operations; the others walk up the CDF together, each stopping at the
    first k whose CDF exceeds its uniform (or, against float64 rounding, once pmf(k) no longer moves the CDF).
    Exact up to float64 rounding. uniform and mean: (B, G) float64.
    """
    n_rows, n_genes = mean.shape
    if theta is None:
        zero_probability = np.exp(-mean)
    else:
        theta = np.broadcast_to(theta, mean.shape)
        zero_probability = np.exp(-theta * np.log1p(mean / theta))
    positions = np.flatnonzero(uniform >= zero_probability)  # row-major: the CSR needs no sorting
    entry_mean = mean.reshape(-1)[positions]
    entry_uniform = uniform.reshape(-1)[positions]
    pmf = zero_probability.reshape(-1)[positions]
    cdf = pmf.copy()
    if theta is None:
        entry_theta, ratio = None, entry_mean
    else:
        entry_theta = theta.reshape(-1)[positions]
        ratio = entry_mean / (entry_theta + entry_mean)
    values = np.zeros(len(positions), dtype=np.float32)
    pending = np.arange(len(positions))
    k = 0
    while pending.size:
        pmf *= ratio / (k + 1) if entry_theta is None else (k + entry_theta) / (k + 1) * ratio
        k += 1
        cdf += pmf
        done = (entry_uniform < cdf) | (pmf <= cdf * np.finfo(np.float64).eps)
        values[pending[done]] = k
        if done.any():
            keep = ~done
            pending, pmf, cdf, entry_uniform, ratio = pending[keep], pmf[keep], cdf[keep], entry_uniform[keep], ratio[keep]
            if entry_theta is not None:
                entry_theta = entry_theta[keep]
    rows, columns = np.divmod(positions, n_genes)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return sp.csr_matrix((values, columns.astype(np.int32), indptr), shape=(n_rows, n_genes))
