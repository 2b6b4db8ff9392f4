"""Synthetic single-cell atlases with known structure, written straight to a Zarr count store in row blocks.

    >>> from scvi_scale.datasets import synthetic_atlas
    >>> store = synthetic_atlas("atlas.zarr", n_cells=200_000)     # CountStore: 200k cells x 2000 genes, CSR

Generative model (natural logs unless a name says log2; the constants below the imports hold the numbers):
- Gene baseline: log-expression b_g ~ Normal(0, 3), capped at 5 so no gene takes more than ~2% of a cell's
  counts; negative-binomial inverse dispersion theta_g ~ LogNormal(log 0.3, 0.5) (overdispersed, as UMI data).
- Gene programmes: 30% of the genes are broadly expressed; each of the others is on in a random 20% of the cell
  types and near silent (log-expression - 5) in the rest. On top, type t plants `markers_per_type` marker genes
  (broad genes between the 50th and 90th expression percentile, disjoint across types) raised by a log2 fold
  change m_tg ~ Uniform(1, 3). Type profile: the softmax over genes of that log-expression.
  Ground truth is recorded: var["marker_of"] (categorical, NaN for non-markers), var["marker_lfc"] = log2 of
  the type's profile over the mean profile of the other types (exact, computed from the profiles), and
  uns["synthetic_atlas"]["true_log2_scale"] (n_cell_types, n_genes), the log2 profiles themselves.
- Batches: cells are in contiguous runs of batches (cell i is in batch floor(i * n_batches / n_cells)), as in an
  atlas concatenated from studies; batch k multiplies each gene by exp(e_kg), e_kg ~ Normal(0, 0.4), shifts the
  median library size by exp(Normal(0, 0.25)), and has its own cell-type composition ~ Dirichlet(3, ..., 3).
- Continuous covariate obs["cycling_score"] ~ Normal(0, 1) scales a programme of 40 "cycling" genes (fewer when
  n_genes < ~1300; disjoint from markers) by exp(c_g * score), c_g ~ Uniform(0.3, 0.8), recorded in
  var["cycling_coef"] (0 elsewhere).
- Library size l_i ~ LogNormal(log library_median + batch shift, 0.4), library_median 2000 by default (non-zeros
  per cell grow slowly with it: ~200 at 2000 genes, ~235 at 3000). Counts: x_ig ~ NB(mean l_i * softmax_g(type
  profile logits + e_k + c score_i), inverse dispersion theta_g), the means in float32 (`negative_binomial_csr`:
  zero or not from one exponential draw per entry in float32, then each non-zero value in float64 by inverting
  the CDF of NB given > 0 for means up to 4, by gamma-Poisson draws repeated until positive above). About 90% of
  the counts are zero at 2000 genes (0.89-0.90 measured).

Reproducibility: parameters come from SeedSequence(seed, spawn_key=(0,)) and cells are generated in fixed blocks
of GENERATION_BLOCK_ROWS cells, block j from SeedSequence(seed, spawn_key=(1, j)); so the same seed gives
byte-identical arrays, and the values do not depend on chunk_rows (only the on-disk chunking does) nor on the
threads that draw the blocks (GENERATION_THREADS of them, while the writer compresses and writes earlier blocks).
Memory: 2 * GENERATION_THREADS generation blocks in flight (1024 x n_genes float32 temporaries, ~25 MB each at 2000
genes) plus the writer's row blocks, whatever n_cells.
"""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.data.store import CountStore
from scvi_scale.data.writer import DEFAULT_CHUNK_ROWS, DEFAULT_ZARR_FORMAT, StoreWriter

GENERATION_BLOCK_ROWS = 1024
BASE_LOG_SD = 3.0
BASE_LOG_CAP = 5.0
BROAD_GENE_FRACTION = 0.3
RESTRICTED_ON_PROBABILITY = 0.2
SILENCED_LOG_SHIFT = -5.0
THETA_MEDIAN = 0.3
THETA_LOG_SD = 0.5
MARKER_LOG2FC_RANGE = (1.0, 3.0)
BATCH_GENE_LOG_SD = 0.4
BATCH_LIBRARY_LOG_SD = 0.25
TYPE_COMPOSITION_ALPHA = 3.0
N_CYCLING_GENES = 40  # at most; a quarter of the candidate genes when they are fewer than 160
DEFAULT_MARKERS_PER_TYPE = 20
CYCLING_COEF_RANGE = (0.3, 0.8)
LIBRARY_MEDIAN = 2000.0
LIBRARY_LOG_SD = 0.4
INVERSION_MAX_MEAN = (
    4.0  # non-zero entries with larger means are drawn by gamma-Poisson (see positive_negative_binomial)
)
INVERSION_FIRST_STEPS = 4  # CDF steps taken by every entry at once before the walk narrows to those left
INVERSION_WINDOW_ENTRIES = 1 << 22  # bound on (entries x k values) held by one window of the CDF walk (32 MB)
GENERATION_THREADS = 2  # blocks drawn at once in threads while the writer compresses and writes earlier ones


@dataclass(frozen=True)
class AtlasParameters:
    """Everything shared by all cells of an atlas; arrays are (genes,), (types, genes) or (batches, ...)."""

    type_log_profile: np.ndarray  # (n_cell_types, n_genes) log-expression before softmax: b + m_t log 2
    batch_gene_log_effect: np.ndarray  # (n_batches, n_genes) e_kg
    batch_library_log_median: np.ndarray  # (n_batches,) log median library size
    batch_type_composition: np.ndarray  # (n_batches, n_cell_types) cell-type probabilities
    cycling_coef: np.ndarray  # (n_genes,) c_g, 0 outside the cycling programme
    theta: np.ndarray  # (n_genes,) inverse dispersion
    marker_type: np.ndarray  # (n_genes,) int, index of the type a gene marks, -1 if none
    marker_log2fc: np.ndarray  # (n_cell_types, n_genes) planted m_tg, 0 off markers


def atlas_parameters(
    n_genes: int,
    n_batches: int,
    n_cell_types: int,
    markers_per_type: int | None,
    seed: int,
    library_median: float = LIBRARY_MEDIAN,
) -> AtlasParameters:
    """Draw the shared parameters of an atlas (see the module docstring) from SeedSequence(seed, spawn_key=(0,)).

    markers_per_type None: DEFAULT_MARKERS_PER_TYPE, or fewer when the genes are too few to hold them.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    base = np.minimum(rng.normal(0.0, BASE_LOG_SD, n_genes), BASE_LOG_CAP)
    theta = np.exp(rng.normal(np.log(THETA_MEDIAN), THETA_LOG_SD, n_genes))
    # Type-restricted genes are on in a random subset of types and near silent in the others.
    restricted = rng.random(n_genes) >= BROAD_GENE_FRACTION
    silenced = restricted[None, :] & (rng.random((n_cell_types, n_genes)) >= RESTRICTED_ON_PROBABILITY)
    # Markers and cycling genes are broad genes between the 50th and 90th percentile of expression: they carry
    # counts, and no marker raised 8-fold takes over a cell's library.
    broad = np.flatnonzero(~restricted)
    by_expression = broad[np.argsort(base[broad])]
    candidates = by_expression[len(broad) // 2 : len(broad) * 9 // 10]
    n_cycling = min(N_CYCLING_GENES, len(candidates) // 4)
    if markers_per_type is None:
        markers_per_type = min(DEFAULT_MARKERS_PER_TYPE, (len(candidates) - n_cycling) // n_cell_types)
    n_special = n_cell_types * markers_per_type + n_cycling
    if markers_per_type < 1 or n_special > len(candidates):
        raise ValueError(
            f"{n_cell_types} cell types x {markers_per_type} markers + {n_cycling} cycling genes need "
            f"{max(n_special, n_cell_types + n_cycling)} of the {len(candidates)} candidate genes among "
            f"n_genes={n_genes}; use more genes, fewer cell types or fewer markers"
        )
    special = rng.permutation(candidates)[:n_special]
    marker_genes = special[: n_cell_types * markers_per_type].reshape(n_cell_types, markers_per_type)
    cycling_genes = special[n_cell_types * markers_per_type :]
    marker_type = np.full(n_genes, -1)
    marker_log2fc = np.zeros((n_cell_types, n_genes))
    for cell_type, genes in enumerate(marker_genes):
        marker_type[genes] = cell_type
        marker_log2fc[cell_type, genes] = rng.uniform(*MARKER_LOG2FC_RANGE, markers_per_type)
    cycling_coef = np.zeros(n_genes)
    cycling_coef[cycling_genes] = rng.uniform(*CYCLING_COEF_RANGE, n_cycling)
    return AtlasParameters(
        type_log_profile=base[None, :] + marker_log2fc * np.log(2.0) + SILENCED_LOG_SHIFT * silenced,
        batch_gene_log_effect=rng.normal(0.0, BATCH_GENE_LOG_SD, (n_batches, n_genes)),
        batch_library_log_median=np.log(library_median) + rng.normal(0.0, BATCH_LIBRARY_LOG_SD, n_batches),
        batch_type_composition=rng.dirichlet(np.full(n_cell_types, TYPE_COMPOSITION_ALPHA), n_batches),
        cycling_coef=cycling_coef,
        theta=theta,
        marker_type=marker_type,
        marker_log2fc=marker_log2fc,
    )


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def true_log2_scale(params: AtlasParameters) -> np.ndarray:
    """(n_cell_types, n_genes) log2 of each type's expected expression share, without batch or covariate."""
    return np.log2(_softmax_rows(params.type_log_profile))


def marker_log2_fold_change(params: AtlasParameters) -> np.ndarray:
    """(n_genes,) for a marker of type t: log2(type t's share / mean share over the other types); 0 elsewhere."""
    scale = _softmax_rows(params.type_log_profile)
    n_types = scale.shape[0]
    lfc = np.zeros(scale.shape[1])
    for cell_type in range(n_types):
        genes = params.marker_type == cell_type
        others = (scale[:, genes].sum(axis=0) - scale[cell_type, genes]) / (n_types - 1)
        lfc[genes] = np.log2(scale[cell_type, genes] / others)
    return lfc


def negative_binomial_csr(rng: np.random.Generator, mean: np.ndarray, theta: np.ndarray) -> sp.csr_matrix:
    """Negative-binomial draws NB(mean, theta) as CSR float32, without building a dense count matrix.

    mean: (rows, genes) means, float32 or float64; theta: (genes,) inverse dispersions.
    1. Zero or not, for every entry at once in float32: with e ~ Exp(1), the entry is non-zero when
       e <= -log P(0) = theta log(1 + mean / theta) (so P(non-zero) is exact up to float32 rounding, ~6e-8);
       this settles ~90% of the entries in five vector operations and one logarithm.
    2. The non-zero entries, in float64, from NB conditioned on > 0 (`positive_negative_binomial`).
    The entries come out in row-major order, so the CSR needs no sorting.
    """
    n_rows, n_genes = mean.shape
    theta32 = np.asarray(theta, dtype=np.float32)
    log_zero = np.multiply(mean, 1.0 / theta32, dtype=np.float32)  # -log P(0) = theta log(1 + mean / theta)
    log_zero += 1.0
    np.log(log_zero, out=log_zero)
    log_zero *= theta32
    positions = np.flatnonzero(rng.standard_exponential(mean.shape, dtype=np.float32) <= log_zero)
    del log_zero
    rows, columns = np.divmod(positions, n_genes)
    entry_mean = mean.reshape(-1)[positions].astype(np.float64)
    values = positive_negative_binomial(rng, entry_mean, np.asarray(theta, dtype=np.float64)[columns])
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return sp.csr_matrix((values, columns.astype(np.int32), indptr), shape=(n_rows, n_genes))


def positive_negative_binomial(rng: np.random.Generator, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """(n,) float32 draws of X | X > 0 for X ~ NB(mean, theta), entry by entry; mean, theta (n,) float64.

    Means up to INVERSION_MAX_MEAN: inversion of the CDF (`_invert_positive_cdf`), whose cost grows with the
    value drawn. Larger means: gamma-Poisson draws (numpy's negative_binomial: the same distribution) repeated
    until positive; their P(0) is at most ~0.75 for the smallest theta of an atlas, so few repeats are needed,
    and the long tails that would keep the CDF walk going are drawn in one step.
    """
    values = np.empty(len(mean), dtype=np.float32)
    large = mean > INVERSION_MAX_MEAN
    small = ~large
    values[small] = _invert_positive_cdf(rng.random(int(small.sum())), mean[small], theta[small])
    pending = np.flatnonzero(large)
    probability = theta / (theta + mean)  # numpy's (n, p) parametrisation of the negative binomial
    while pending.size:
        draws = rng.negative_binomial(theta[pending], probability[pending])
        positive = draws > 0
        values[pending[positive]] = draws[positive]
        pending = pending[~positive]
    return values


def _invert_positive_cdf(uniform: np.ndarray, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """X | X > 0 by inverting the NB CDF F in float64: the first k >= 1 with F(k) > t, t = F(0) + (1 - F(0)) u.

    uniform, mean, theta: (n,) float64. pmf(k + 1) = pmf(k) (k + theta) / (k + 1) * mean / (theta + mean). The first
    INVERSION_FIRST_STEPS values of k are tried for every entry at once (most stop there); the others walk on in
    widening windows of k, one window per vector pass, and stop at the first k whose CDF passes t (or, against
    float64 rounding, where pmf no longer moves the CDF).
    """
    ratio = mean / (theta + mean)
    pmf = np.exp(theta * np.log(theta / (theta + mean)))  # P(0)
    cdf = pmf.copy()
    target = cdf + (1.0 - cdf) * uniform
    values = np.ones(len(mean), dtype=np.float32)
    for k in range(INVERSION_FIRST_STEPS):
        pmf *= (k + theta) * ratio / (k + 1)
        cdf += pmf
        values += target >= cdf  # 1 + the number of F(1..k+1) not above t
    pending = np.flatnonzero(target >= cdf)
    pmf, cdf, theta, ratio, target = pmf[pending], cdf[pending], theta[pending], ratio[pending], target[pending]
    k, width = INVERSION_FIRST_STEPS, INVERSION_FIRST_STEPS
    while pending.size:
        steps = np.arange(k, k + width, dtype=np.float64)
        window_pmf = (steps + theta[:, None]) * ratio[:, None] / (steps + 1.0)
        np.cumprod(window_pmf, axis=1, out=window_pmf)
        window_pmf *= pmf[:, None]
        window_cdf = np.cumsum(window_pmf, axis=1)
        window_cdf += cdf[:, None]
        passed = target[:, None] < window_cdf
        first = passed.argmax(axis=1)
        done = passed[np.arange(len(first)), first]
        stuck = ~done & (window_pmf[:, -1] <= window_cdf[:, -1] * np.finfo(np.float64).eps)
        first[stuck] = width - 1
        done |= stuck
        values[pending[done]] = k + 1 + first[done]
        keep = ~done
        pending, theta, ratio, target = pending[keep], theta[keep], ratio[keep], target[keep]
        pmf, cdf = window_pmf[keep, -1], window_cdf[keep, -1]
        k += width
        width = min(2 * width, max(INVERSION_FIRST_STEPS, INVERSION_WINDOW_ENTRIES // max(1, pending.size)))
    return values


def _group_profiles(params: AtlasParameters, cell_type: np.ndarray, batch: np.ndarray):
    """The (type, batch) expression profiles of a block's cells, so that no (cells x genes) softmax is needed.

    Returns (profiles (n_groups, n_genes) float64, exp(logits - row max) over the groups present in the block;
    group (cells,) int, each cell's row). Only the groups present are made: memory does not grow with the number
    of types or batches.
    """
    n_batches = params.batch_type_composition.shape[0]
    present, group = np.unique(cell_type * n_batches + batch, return_inverse=True)
    logits = params.type_log_profile[present // n_batches] + params.batch_gene_log_effect[present % n_batches]
    return np.exp(logits - logits.max(axis=1, keepdims=True)), group


def generate_block(params: AtlasParameters, seed: int, block: int, n_cells: int):
    """Cells [block * GENERATION_BLOCK_ROWS, ...) of the atlas: (counts CSR float32, batch, cell type, score)."""
    start = block * GENERATION_BLOCK_ROWS
    cells = np.arange(start, min(start + GENERATION_BLOCK_ROWS, n_cells))
    n_batches, n_types = params.batch_type_composition.shape
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, block)))
    batch = cells * n_batches // n_cells
    uniform = rng.random(len(cells))
    cumulative = np.cumsum(params.batch_type_composition[batch], axis=1)
    cell_type = np.minimum((uniform[:, None] >= cumulative).sum(axis=1), n_types - 1)
    score = rng.normal(0.0, 1.0, len(cells))
    library = np.exp(rng.normal(params.batch_library_log_median[batch], LIBRARY_LOG_SD))
    # softmax_g(type + batch + c_g score) = profile_g exp(c_g score) / its sum over g: the (type, batch) profiles
    # are shared by many cells and the covariate moves only the cycling genes, so the sum costs n_cycling per cell.
    profiles, group = _group_profiles(params, cell_type, batch)
    cycling = np.flatnonzero(params.cycling_coef)
    boost = np.exp(np.outer(score, params.cycling_coef[cycling]))  # (cells, n_cycling)
    normaliser = profiles.sum(axis=1)[group] + (profiles[:, cycling][group] * (boost - 1.0)).sum(axis=1)
    # float32 for the (cells x genes) means: they need no more precision than that
    mean = profiles.astype(np.float32)[group]
    mean *= (library / normaliser).astype(np.float32)[:, None]
    mean[:, cycling] *= boost.astype(np.float32)
    return negative_binomial_csr(rng, mean, params.theta), batch, cell_type, score


def synthetic_atlas(
    path,
    n_cells: int,
    n_genes: int = 2000,
    n_batches: int = 4,
    n_cell_types: int = 8,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    markers_per_type: int | None = None,
    zarr_format: int = DEFAULT_ZARR_FORMAT,
    overwrite: bool = False,
    library_median: float = LIBRARY_MEDIAN,
) -> CountStore:
    """Write a synthetic atlas of n_cells x n_genes counts (CSR) to `path` and return it opened.

    obs: "batch" (categorical "batch_0", ...), "cell_type" (categorical "type_0", ...), "cycling_score" (float).
    var: "marker_of", "marker_lfc" (log2), "cycling_coef", "theta". uns["synthetic_atlas"]: the arguments and
    "true_log2_scale". markers_per_type: None gives 20 (fewer when n_genes is too small to hold them: about
    0.12 n_genes genes are candidates; the number used is in uns). library_median: median library size (UMIs
    per cell) before the batches' shifts. See the module docstring for the model and for reproducibility.
    """
    if n_cells < 1 or n_genes < 1 or n_batches < 1 or n_cell_types < 2:
        raise ValueError(
            f"need n_cells, n_genes, n_batches >= 1 and n_cell_types >= 2; got {n_cells}, {n_genes}, "
            f"{n_batches}, {n_cell_types}"
        )
    if not library_median > 0:
        raise ValueError(f"library_median must be positive, got {library_median}")
    params = atlas_parameters(n_genes, n_batches, n_cell_types, markers_per_type, seed, library_median)
    type_names = [f"type_{index}" for index in range(n_cell_types)]
    batch_dtype = pd.CategoricalDtype([f"batch_{index}" for index in range(n_batches)])
    type_dtype = pd.CategoricalDtype(type_names)
    var = pd.DataFrame(
        {
            "marker_of": pd.Categorical.from_codes(params.marker_type, dtype=type_dtype),
            "marker_lfc": marker_log2_fold_change(params),
            "cycling_coef": params.cycling_coef,
            "theta": params.theta,
        },
        index=[f"gene_{index}" for index in range(n_genes)],
    )
    uns = {
        "synthetic_atlas": {
            "n_cells": n_cells,
            "n_genes": n_genes,
            "n_batches": n_batches,
            "n_cell_types": n_cell_types,
            "seed": seed,
            "markers_per_type": int(np.count_nonzero(params.marker_type == 0)),
            "library_median": library_median,
            "true_log2_scale": true_log2_scale(params),
        }
    }
    # validate=False: the sampler only produces non-negative integers, so checking them would only cost time.
    with StoreWriter(
        path, var, chunk_rows=chunk_rows, zarr_format=zarr_format, overwrite=overwrite, validate=False
    ) as writer:
        _write_generated_blocks(writer, params, seed, n_cells, batch_dtype, type_dtype)
        writer.close(uns=uns)
    return CountStore(path)


def _write_generated_blocks(writer: StoreWriter, params, seed: int, n_cells: int, batch_dtype, type_dtype) -> None:
    """Append the atlas's n_cells cells to `writer`, block by block (generate_block), with their obs.

    Blocks are drawn in threads (numpy releases the GIL) while this thread hands the earlier ones to the writer,
    which compresses and writes them. Results are taken in block order, so the store does not depend on the
    threads; at most 2 * GENERATION_THREADS blocks are in flight."""
    blocks = iter(range(-(-n_cells // GENERATION_BLOCK_ROWS)))
    pool = ThreadPoolExecutor(GENERATION_THREADS, thread_name_prefix="scvi-scale-atlas")
    try:
        in_flight = deque(
            pool.submit(generate_block, params, seed, block, n_cells)
            for block in itertools.islice(blocks, 2 * GENERATION_THREADS)
        )
        while in_flight:
            counts, batch, cell_type, score = in_flight.popleft().result()
            for block in itertools.islice(blocks, 1):
                in_flight.append(pool.submit(generate_block, params, seed, block, n_cells))
            first = writer.n_obs
            obs = pd.DataFrame(
                {
                    "batch": pd.Categorical.from_codes(batch, dtype=batch_dtype),
                    "cell_type": pd.Categorical.from_codes(cell_type, dtype=type_dtype),
                    "cycling_score": score,
                },
                index=[f"cell_{index}" for index in range(first, first + counts.shape[0])],
            )
            writer.append(counts, obs)
    finally:
        pool.shutdown(cancel_futures=True)
