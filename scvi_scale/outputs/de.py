"""scVI's Bayesian differential expression, from posterior samples of the normalized expression, in numpy.

The statistics are scvi-tools' (`DifferentialComputation.get_bayes_factors`, `_de_core`,
`scrna_raw_counts_properties`), with their names, defaults and output columns; see `bayes_factors`. What differs is
only how the inputs are gathered (differential.py): the raw statistics of every group come from one
streaming pass over the counts (`GroupStatistics`), never from the counts of a group held in memory.

Shapes: G genes; posterior samples are (n_samples, G) float32 arrays of px_scale (expression fractions).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

EPS = 1e-8  # scvi-tools' guard in log(p + eps)
RAW_NORMALIZATION_TOTAL = 1e4  # scvi-tools normalizes raw counts to 10,000 per cell for raw_normalized_mean
PSEUDOCOUNT_FLOOR = 1e-5
LFC_PSEUDOCOUNT_SHRINK = 1e-3  # the lfc_* summaries use pseudocounts * 1e-3, as scvi-tools does
TEST_MODES = ("two", "three")
MODES = ("vanilla", "change")


class GroupStatistics:
    """Per-group sums of raw counts, accumulated block by block: one streaming pass gives every group's
    raw_mean, non_zeros_proportion and raw_normalized_mean (scvi-tools' scrna_raw_counts_properties).

    Groups are integer codes 0..n_groups-1; code -1 (a cell in no group, e.g. NaN in groupby) is kept in an extra
    slot so that "rest" (every cell not in a group) counts it, as scvi-tools' complement does. All sums are
    float64 (n_groups + 1, G). Raw normalized counts are counts * 1e4 / (the cell's total count); a cell with no
    counts contributes 0 (scvi-tools would divide by zero).
    """

    def __init__(self, n_groups: int, n_genes: int):
        self.n_groups = n_groups
        self.cells = np.zeros(n_groups + 1)
        self.sums = np.zeros((n_groups + 1, n_genes))
        self.nonzero = np.zeros((n_groups + 1, n_genes))
        self.normalized_sums = np.zeros((n_groups + 1, n_genes))

    def add(self, counts, codes: np.ndarray) -> None:
        """Accumulate a block: counts (B, G) dense or scipy sparse; codes (B,) int group codes (-1: no group).

        Each block's sums are float32 products with a one-hot group matrix (exact for integer counts below 2^24
        per block and gene), added to the float64 totals."""
        codes = np.where(np.asarray(codes) < 0, self.n_groups, codes)
        n_cells = len(codes)
        library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(RAW_NORMALIZATION_TOTAL, library, out=np.zeros_like(library), where=library > 0)
        membership = np.zeros((self.n_groups + 1, n_cells), dtype=np.float32)
        membership[codes, np.arange(n_cells)] = 1.0
        if sp.issparse(counts):
            counts = sp.csr_matrix(counts, dtype=np.float32)
            expressed = counts.copy()
            expressed.data = (expressed.data != 0).astype(np.float32)
        else:
            counts = np.asarray(counts, dtype=np.float32)
            expressed = (counts != 0).astype(np.float32)
        self.cells += np.bincount(codes, minlength=self.n_groups + 1)
        self.sums += np.asarray(membership @ counts)
        self.nonzero += np.asarray(membership @ expressed)
        self.normalized_sums += np.asarray((membership * scale.astype(np.float32)) @ counts)

    def merge(self, other: GroupStatistics) -> None:
        self.cells += other.cells
        self.sums += other.sums
        self.nonzero += other.nonzero
        self.normalized_sums += other.normalized_sums

    def _side(self, group: int | None, rest_of: int | None) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """(cells, sums, nonzero, normalized sums) of one group, or of every cell outside group `rest_of`."""
        if group is not None:
            return self.cells[group], self.sums[group], self.nonzero[group], self.normalized_sums[group]
        return (
            self.cells.sum() - self.cells[rest_of],
            self.sums.sum(0) - self.sums[rest_of],
            self.nonzero.sum(0) - self.nonzero[rest_of],
            self.normalized_sums.sum(0) - self.normalized_sums[rest_of],
        )

    def properties(self, group1: int, group2: int | None) -> dict[str, np.ndarray]:
        """scvi-tools' raw-count columns for group1 against group2 (None: every other cell)."""
        columns = {}
        for suffix, side in (("1", self._side(group1, None)), ("2", self._side(group2, group1))):
            cells, sums, nonzero, normalized = side
            cells = max(cells, 1.0)
            columns[f"raw_mean{suffix}"] = sums / cells
            columns[f"non_zeros_proportion{suffix}"] = nonzero / cells
            columns[f"raw_normalized_mean{suffix}"] = normalized / cells
        return {
            name: columns[name]
            for name in (
                "raw_mean1",
                "raw_mean2",
                "non_zeros_proportion1",
                "non_zeros_proportion2",
                "raw_normalized_mean1",
                "raw_normalized_mean2",
            )
        }


def pair_samples(
    scales1: np.ndarray,
    batches1: np.ndarray,
    scales2: np.ndarray,
    batches2: np.ndarray,
    use_observed_batches: bool,
    use_permutation: bool,
    m_permutation: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """The (n_pairs, G) sample pairs compared gene-wise, as scvi-tools builds them.

    batchesK: the batch code each sample was decoded in (-1: its observed batch). With batch correction and the
    same batches on both sides, samples are paired within each batch (m_permutation // n_batches pairs per batch
    when use_permutation); otherwise all samples are paired in order (or m_permutation random pairs).
    """

    def pairs(first: np.ndarray, second: np.ndarray, n_pairs: int):
        if use_permutation:
            return first[rng.choice(len(first), n_pairs)], second[rng.choice(len(second), n_pairs)]
        if len(first) != len(second):
            raise ValueError(
                f"the groups have {len(first)} and {len(second)} posterior samples, which cannot be paired; "
                "pass use_permutation=True to draw m_permutation random pairs"
            )
        return first, second

    values1, values2 = np.unique(batches1), np.unique(batches2)
    if set(values1.tolist()) == set(values2.tolist()) and not use_observed_batches:
        per_batch = m_permutation // len(values1)
        paired = [pairs(scales1[batches1 == b], scales2[batches2 == b], per_batch) for b in values1]
        return np.concatenate([p[0] for p in paired]), np.concatenate([p[1] for p in paired])
    if not use_observed_batches and np.intersect1d(values1, values2).size:
        warnings.warn(
            "Batchids of cells groups 1 and 2 are different but have a non-null intersection; such a comparison "
            "is not batch corrected in a trustworthy way (as in scvi-tools).",
            UserWarning,
            stacklevel=3,
        )
    return pairs(scales1, scales2, m_permutation)


def estimate_pseudocounts_offset(
    scales_a: np.ndarray,
    scales_b: np.ndarray,
    where_zero_a: np.ndarray,
    where_zero_b: np.ndarray,
    quantile: float = 0.9,
) -> float:
    """scvi-tools' pseudocount: per group, the `quantile` of the largest sampled scale among genes that group does
    not express (where_zero: raw mean below threshold_counts), the larger of the two, at least 1e-5."""
    offsets = []
    for scales, where_zero in ((scales_a, where_zero_a), (scales_b, where_zero_b)):
        maxima = scales.max(axis=0)
        offsets.append(np.quantile(maxima[where_zero], quantile) if where_zero.any() else PSEUDOCOUNT_FLOOR)
    return float(max(PSEUDOCOUNT_FLOOR, *offsets))


def estimate_delta(lfc_means: np.ndarray, coef: float = 0.6, min_thres: float = 0.1) -> float:
    """scvi-tools' data-driven LFC threshold for delta=None: coef times the mean absolute value of the outer means
    of a 3-component Gaussian mixture fitted to the genes' mean LFCs, at least min_thres. Needs scikit-learn."""
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError as error:
        message = "delta=None estimates delta with scikit-learn, which is not installed; pass a delta"
        raise ImportError(message) from error
    mixture = GaussianMixture(n_components=3).fit(np.asarray(lfc_means)[:, None])
    means = np.sort(mixture.means_.squeeze())
    return float(max(min_thres, coef * np.abs(means[[0, -1]]).mean()))


def describe_lfc(lfc: np.ndarray) -> dict[str, np.ndarray]:
    """lfc_mean, lfc_median, lfc_std, lfc_min, lfc_max over the samples (axis 0) of a (n_pairs, G) array."""
    return {
        "lfc_mean": lfc.mean(0),
        "lfc_median": np.median(lfc, 0),
        "lfc_std": lfc.std(0),
        "lfc_min": lfc.min(0),
        "lfc_max": lfc.max(0),
    }


def bayes_factors(
    scales1: np.ndarray,
    scales2: np.ndarray,
    mean_scale1: np.ndarray,
    mean_scale2: np.ndarray,
    mode: str = "vanilla",
    delta: float | None = 0.25,
    pseudocounts: float | None = None,
    where_zero1: np.ndarray | None = None,
    where_zero2: np.ndarray | None = None,
    test_mode: str = "three",
) -> dict[str, np.ndarray]:
    """scvi-tools' DE statistics from paired (n_pairs, G) posterior samples of the two groups.

    mean_scaleK: the group's mean sampled scale over all its samples (the scale1 / scale2 columns).
    mode "vanilla" (Lopez et al. 2018): proba_m1 = P(scale1 > scale2), proba_m2 = 1 - proba_m1,
        bayes_factor = log(proba_m1 + eps) - log(proba_m2 + eps).
    mode "change" (Boyeau et al. 2019): lfc = log2(scale1 + pc) - log2(scale2 + pc) per pair; proba_m1 =
        P(lfc >= delta), proba_m2 = P(lfc < -delta); test_mode "three": proba_de = max(proba_m1, proba_m2) and
        the Bayes factor carries the sign of proba_m1 - proba_m2; "two": proba_de = proba_m1 + proba_m2.
        pseudocounts None: estimated (estimate_pseudocounts_offset) from where_zero1/2; delta None: estimated
        (estimate_delta). The lfc_* summaries use pseudocounts * 1e-3.
    """
    if mode == "vanilla":
        proba_m1 = np.mean(scales1 > scales2, axis=0)
        proba_m2 = 1.0 - proba_m1
        return {
            "proba_m1": proba_m1,
            "proba_m2": proba_m2,
            "bayes_factor": np.log(proba_m1 + EPS) - np.log(proba_m2 + EPS),
            "scale1": mean_scale1,
            "scale2": mean_scale2,
        }
    if mode != "change":
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if test_mode not in TEST_MODES:
        raise ValueError(f"test_mode={test_mode!r}: expected one of {TEST_MODES}")
    if pseudocounts is None:
        if where_zero1 is None or where_zero2 is None:
            raise ValueError("pseudocounts=None: where_zero1 and where_zero2 are needed to estimate it")
        pseudocounts = estimate_pseudocounts_offset(scales1, scales2, where_zero1, where_zero2)

    def lfc(offset: float) -> np.ndarray:
        return np.log2(scales1 + offset) - np.log2(scales2 + offset)

    change = lfc(pseudocounts)
    delta_ = estimate_delta(change.mean(0)) if delta is None else delta
    proba_m1 = np.mean(change >= delta_, axis=0)
    proba_m2 = np.mean(change < -delta_, axis=0)
    if test_mode == "two":
        proba_de, sign = proba_m1 + proba_m2, 1.0
    else:
        proba_de, sign = np.maximum(proba_m1, proba_m2), np.sign(proba_m1 - proba_m2)
    del change
    return {
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": sign * (np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS)),
        "scale1": mean_scale1,
        "scale2": mean_scale2,
        "pseudocounts": np.full(scales1.shape[1], pseudocounts),
        "delta": np.full(scales1.shape[1], delta_),
        **describe_lfc(lfc(LFC_PSEUDOCOUNT_SHRINK * pseudocounts)),
    }


def fdr_de_prediction(proba_de: np.ndarray, fdr: float = 0.05) -> np.ndarray:
    """scvi-tools' posterior expected FDR control: with genes ranked by decreasing proba_de, the running mean of
    (1 - proba_de) is the expected FDR of calling the top genes; the top n are called DE, n being the number of
    ranks where that mean is at most `fdr`. Returns a bool array aligned with proba_de."""
    proba_de = np.asarray(proba_de, dtype=np.float64)
    order = np.argsort(-proba_de, kind="stable")
    expected_fdr = np.cumsum(1.0 - proba_de[order]) / np.arange(1, len(order) + 1)
    called = np.zeros(len(order), dtype=bool)
    called[order[: int(np.count_nonzero(expected_fdr <= fdr))]] = True
    return called
