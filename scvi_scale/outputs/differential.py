"""Differential expression over a store: which cells are compared, their posterior samples, one table per
comparison. The statistics themselves are de.py's; this file gathers their inputs, in bounded memory.

    >>> comparisons = compare_groups(store, groupby="cell_type")            # one-vs-rest, as scvi-tools
    >>> table = differential_expression(inputs, request, comparisons, DEOptions(mode="change"), batches, genes)

Per comparison, side and batch condition (the cells' observed batch, or with batch_correction each of batchid1 /
batchid2, default all batches), n_samples_overall / n_conditions cells are drawn at random with replacement and
decoded once each (px_scale); with weights="importance" the draws are picked by importance weight instead
(importance.py); with filter_outlier_cells, each side's outliers in the latent space are left out first
(scikit-learn's EllipticEnvelope, as scvi-tools). The draws of all comparisons are decoded in one pass over the
store (requested cells touch nearly every chunk of an atlas, so a pass per comparison would read it once each)
and kept in a temporary file, read back one comparison at a time: memory holds one comparison's samples, disk
n_comparisons x n_samples_overall x 2 sides x G x 4 bytes (1.6 GB for 20 groups of 2,000 genes); past
max_sample_bytes the comparisons are split into passes. Cells are picked and (with use_permutation) paired by
generators of their own, and the draws are keyed by request number, so how the comparisons fall into passes does
not change the result. The raw-count columns come from one streaming pass over all cells, whatever the number
of groups.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scvi_scale.outputs import de
from scvi_scale.outputs.arguments import batch_codes, cell_mask
from scvi_scale.outputs.importance import ImportanceOptions, importance_sample
from scvi_scale.outputs.jobs import OWN_BATCH, LatentJob, RawStatsJob
from scvi_scale.outputs.runner import ModelInputs, OutputRequest, Unit, cut_units, iter_results, run, scale_draws

DE_SAMPLE_BYTES = 8 << 30  # posterior samples a pass gathers in its temporary file (one read of the store a pass)


@dataclass(frozen=True)
class DEOptions:
    """scvi-tools' differential_expression / get_bayes_factors options, with its defaults (see de.bayes_factors),
    and max_sample_bytes: the posterior samples one pass over the store gathers (on disk; memory holds one
    comparison's)."""

    mode: str = "vanilla"
    delta: float | None = 0.25
    all_stats: bool = True
    batch_correction: bool = False
    batchid1: object = None
    batchid2: object = None
    fdr_target: float = 0.05
    n_samples_overall: int = 5000
    use_permutation: bool = False
    m_permutation: int = 10000
    pseudocounts: float | None = None
    threshold_counts: float = 0.01
    test_mode: str = "three"
    max_sample_bytes: int = DE_SAMPLE_BYTES
    weights: str = "uniform"
    filter_outlier_cells: bool = False
    importance: ImportanceOptions = ImportanceOptions()

    def __post_init__(self):
        if self.mode not in de.MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {de.MODES}")
        if self.test_mode not in de.TEST_MODES:
            raise ValueError(f"test_mode={self.test_mode!r}: expected one of {de.TEST_MODES}")
        if self.mode == "change" and self.delta is None and importlib.util.find_spec("sklearn") is None:
            raise ImportError("delta=None estimates delta with scikit-learn, which is not installed; pass a delta")
        if not self.batch_correction and (self.batchid1 is not None or self.batchid2 is not None):
            raise ValueError("batchid1 / batchid2 choose the batches to decode in: they need batch_correction=True")
        if self.weights not in ("uniform", "importance"):
            raise ValueError(f"weights={self.weights!r}: expected 'uniform' or 'importance'")
        if self.filter_outlier_cells and importlib.util.find_spec("sklearn") is None:
            raise ImportError("filter_outlier_cells uses scikit-learn's EllipticEnvelope, which is not installed")


@dataclass(frozen=True)
class Comparisons:
    """codes: (n_obs,) int32 group of each cell, -1 for cells in no group; names: the group names; pairs:
    [(group1 code, group2 code or None: all other cells)]; labelled: whether rows get comparison/group1/group2
    columns (groupby comparisons do, idx1/idx2 ones do not, as in scvi-tools)."""

    codes: np.ndarray
    names: list[str]
    pairs: list[tuple[int, int | None]]
    labelled: bool

    def sides(self, group1: int, group2: int | None) -> dict[int, np.ndarray]:
        """Store rows of each side of a comparison."""
        other = self.codes != group1 if group2 is None else self.codes == group2
        return {1: np.flatnonzero(self.codes == group1), 2: np.flatnonzero(other)}

    def without_outliers(self, inputs: ModelInputs, request: OutputRequest) -> Comparisons:
        """The comparisons with each group's outliers in the latent space (EllipticEnvelope on its cells' latent
        means) left out of it (code -1); "Rest" sides keep all other cells, as scvi-tools filters the two
        selections it is given."""
        from sklearn.covariance import EllipticEnvelope

        codes = self.codes.copy()
        for group in sorted({code for pair in self.pairs for code in pair if code is not None}):
            rows = np.flatnonzero(self.codes == group)
            latent = run(inputs, LatentJob(), request.replace(indices=rows))["latent"]
            try:
                inlier = EllipticEnvelope().fit_predict(latent) == 1
            except ValueError:
                warnings.warn("Could not properly estimate Cov!, using all samples", UserWarning, stacklevel=3)
                continue
            codes[rows[~inlier]] = -1
        return Comparisons(codes, self.names, self.pairs, self.labelled)


def compare_groups(store, groupby=None, group1=None, group2=None, idx1=None, idx2=None) -> Comparisons:
    """The comparisons scvi-tools' _de_core makes: obs[groupby] values group1 (default: every value with cells,
    one-vs-rest) against group2 (default: all other cells, "Rest"); or cells idx1 against idx2 (boolean masks,
    integer positions or an obs query string; idx2 None: all other cells)."""
    if idx1 is not None:
        codes = np.full(store.n_obs, -1, dtype=np.int32)
        codes[cell_mask(store, idx1, "idx1")] = 0
        if idx2 is not None:
            codes[cell_mask(store, idx2, "idx2")] = 1
        if not (codes == 0).any() or (idx2 is not None and not (codes == 1).any()):
            raise ValueError("One of idx1 or idx2 has size zero.")
        return Comparisons(codes, ["one", "two"], [(0, None if idx2 is None else 1)], labelled=False)
    if groupby is None:
        raise ValueError("pass groupby (an obs column) or idx1 to choose the cells to compare")
    column = store.obs_column(groupby)
    if isinstance(column.dtype, pd.CategoricalDtype):  # the groups sorted, as from the values, without an object array
        categories = sorted(column.cat.categories[np.unique(column.cat.codes[column.cat.codes >= 0])].tolist())
        lookup = pd.Index(categories).get_indexer(column.cat.categories)
        raw = column.cat.codes.to_numpy()
        codes = np.where(raw < 0, -1, lookup[raw]).astype(np.int32)
    else:
        values = pd.Categorical(column.to_numpy())
        categories, codes = list(values.categories), values.codes.astype(np.int32)
    sizes = np.bincount(codes[codes >= 0], minlength=len(categories))
    if group1 is None:
        group1 = [category for category, size in zip(categories, sizes) if size > 0]
        if len(group1) == 1:
            raise ValueError("Only a single group in the data. Can't run DE on a single group.")
    elif isinstance(group1, str) or not isinstance(group1, Iterable):
        group1 = [group1]
    for value in [*group1, *([] if group2 is None else [group2])]:
        if value not in categories:
            raise ValueError(f"{value!r} is not a value of obs[{groupby!r}]; its values are {categories[:20]}")
        if sizes[categories.index(value)] == 0:
            raise ValueError(f"group {value!r} of obs[{groupby!r}] has no cells")
    pairs = [(categories.index(value), None if group2 is None else categories.index(group2)) for value in group1]
    return Comparisons(codes, [str(category) for category in categories], pairs, labelled=True)


def differential_expression(
    inputs: ModelInputs,
    request: OutputRequest,
    comparisons: Comparisons,
    options: DEOptions,
    batch_categories: list,
    var_names: pd.Index,
) -> pd.DataFrame:
    """One DataFrame (index: gene names, one block of rows per comparison, scvi-tools' columns and row order)."""
    statistics = None
    if options.all_stats or (options.mode == "change" and options.pseudocounts is None):
        statistics = group_statistics(inputs, request, comparisons.codes, len(comparisons.names))
    if options.filter_outlier_cells:
        comparisons = comparisons.without_outliers(inputs, request)
    conditions = _conditions(options, batch_categories)
    per_condition = _cells_per_condition(options.n_samples_overall, conditions)
    pick_rng = np.random.default_rng(np.random.SeedSequence(request.seed, spawn_key=(0,)))
    pair_rng = np.random.default_rng(np.random.SeedSequence(request.seed, spawn_key=(1,)))
    bytes_per_comparison = sum(len(conditions[s]) * per_condition[s] for s in (1, 2)) * inputs.store.n_vars * 4
    per_pass = max(1, int(options.max_sample_bytes // bytes_per_comparison))
    frames = []
    picker = _Picker(inputs, request, options, pick_rng)
    for first in range(0, len(comparisons.pairs), per_pass):
        passed = comparisons.pairs[first : first + per_pass]
        rows, batches, numbers, blocks = _pick_cells(comparisons, passed, conditions, per_condition, picker)
        with _DrawFile(numbers, inputs.store.n_vars) as draws:
            for drawn, values in scale_draws(
                inputs,
                request,
                rows,
                batches,
                numbers,
                genes=None,
                library_size=1.0,
                description="DE posterior samples",
            ):
                draws.put(drawn, values)
            for pair, own_blocks in zip(passed, blocks):
                sides = {side: _side_samples(draws, numbers, own_blocks, side) for side in (1, 2)}
                frames.append(_frame(sides, pair, comparisons, statistics, options, var_names, pair_rng))
    return pd.concat(frames, axis=0)


def group_statistics(inputs: ModelInputs, request: OutputRequest, codes: np.ndarray, n_groups: int):
    """de.GroupStatistics of every group in one streaming pass over all cells."""
    units = [
        Unit(unit.index, unit.rows, codes[unit.rows])
        for unit in cut_units(range(inputs.store.n_obs), request.unit_rows(inputs.store))
    ]
    statistics = de.GroupStatistics(n_groups, inputs.store.n_vars)
    # merged as units finish (each unit's are n_groups x G sums, ~1 MB for 20 groups of 2,000 genes, and an atlas
    # has thousands of units), in unit order whatever order workers finish in: the same float sums every time
    waiting, next_unit = {}, 0
    for index, result in iter_results(inputs, RawStatsJob(n_groups), units, request, description="DE raw statistics"):
        waiting[index] = result["stats"]
        while next_unit in waiting:
            statistics.merge(waiting.pop(next_unit))
            next_unit += 1
    return statistics


def _conditions(options: DEOptions, batch_categories: list) -> dict[int, tuple[int, ...]]:
    """The batches each side is decoded in: its observed batch, or with batch_correction the chosen batches."""
    if not options.batch_correction:
        return {1: (OWN_BATCH,), 2: (OWN_BATCH,)}
    return {
        side: batch_codes(batch_categories, batch_categories if batchid is None else batchid)
        for side, batchid in ((1, options.batchid1), (2, options.batchid2))
    }


def _cells_per_condition(n_samples_overall: int, conditions: dict) -> dict[int, int]:
    per_condition = {side: int(n_samples_overall / len(conditions[side])) for side in (1, 2)}
    for side in (1, 2):
        if per_condition[side] == 0:
            warnings.warn(
                "very small sample size, please consider increasing `n_samples_overall`", UserWarning, stacklevel=3
            )
            per_condition[side] = 2
    return per_condition


class _Picker:
    """Which draws a side's samples are: cells picked uniformly with replacement, one draw each (numbered in
    order), or draws picked by importance weight from a pool (importance.py). Numbers never repeat across sides,
    so every side has draws of its own."""

    def __init__(self, inputs: ModelInputs, request: OutputRequest, options: DEOptions, rng):
        self.inputs, self.request, self.options, self.rng = inputs, request, options, rng
        self.next_number = 0

    def __call__(self, cells: np.ndarray, n_samples: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        first = self.next_number
        if self.options.weights == "importance":
            rows, numbers = importance_sample(
                self.inputs, self.request, cells, n_samples, batch, self.options.importance, self.rng, first
            )
            self.next_number = first + (n_samples // len(cells) + 1) * len(cells)
            return rows, numbers
        self.next_number = first + n_samples
        return self.rng.choice(cells, size=n_samples, replace=True), first + np.arange(n_samples)


def _pick_cells(comparisons: Comparisons, pairs, conditions, per_condition, picker: _Picker):
    """Requested rows, batches and draw numbers for the comparisons of one pass, and per comparison its blocks
    of requests [(side, batch, start, stop)]."""
    rows, batches, numbers, blocks, offset = [], [], [], [], 0
    for group1, group2 in pairs:
        sides = comparisons.sides(group1, group2)
        own = []
        for side in (1, 2):
            for condition in conditions[side]:
                picked, picked_numbers = picker(sides[side], per_condition[side], condition)
                rows.append(picked)
                batches.append(np.full(len(picked), condition))
                numbers.append(picked_numbers)
                own.append((side, condition, offset, offset + len(picked)))
                offset += len(picked)
        blocks.append(own)
    return np.concatenate(rows), np.concatenate(batches), np.concatenate(numbers), blocks


class _DrawFile:
    """The posterior draws of one pass (n_draws x G float32, row i the draw numbered numbers[i] in increasing
    order) in a temporary file, unlinked from the start, so that a pass holds in memory one comparison's
    samples, not all of them, and a crash leaves nothing behind. Its folder is tempfile's (TMPDIR)."""

    def __init__(self, numbers: np.ndarray, n_genes: int):
        self.numbers = np.unique(numbers)
        self.row_bytes = n_genes * 4
        self.n_genes = n_genes
        self.file = tempfile.TemporaryFile(prefix="scvi-scale-de-")

    def __enter__(self) -> _DrawFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()

    def put(self, numbers: np.ndarray, draws: np.ndarray) -> None:
        """Store draws (k, G) of the given numbers, one write per run of consecutive rows."""
        positions = np.searchsorted(self.numbers, numbers)
        order = np.argsort(positions, kind="stable")
        positions, draws = positions[order], np.ascontiguousarray(draws[order], dtype=np.float32)
        starts = np.flatnonzero(np.diff(positions, prepend=-2) != 1)
        for start, stop in zip(starts, [*starts[1:], len(positions)]):
            data = memoryview(draws[start:stop]).cast("B")  # type: ignore[arg-type]  # numpy stubs: __buffer__ from 3.12
            offset = int(positions[start]) * self.row_bytes
            while data:  # pwrite may write less than asked
                written = os.pwrite(self.file.fileno(), data, offset)
                data, offset = data[written:], offset + written

    def get(self, numbers: np.ndarray) -> np.ndarray:
        """The draws (len(numbers), G) of the given numbers, read as one span of rows: a side's draws are
        numbered consecutively (_Picker), so the span is its own."""
        positions = np.searchsorted(self.numbers, numbers)
        low, high = int(positions.min()), int(positions.max()) + 1
        span = os.pread(self.file.fileno(), (high - low) * self.row_bytes, low * self.row_bytes)
        if len(span) != (high - low) * self.row_bytes:
            raise OSError(f"DE posterior samples: short read of the temporary file {self.file.name}")
        return np.frombuffer(span, dtype=np.float32).reshape(high - low, self.n_genes)[positions - low]


def _side_samples(draws: _DrawFile, numbers: np.ndarray, blocks, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(posterior samples (n, G), the batch each was decoded in (n,)) of one side of a comparison."""
    own = [(batch, start, stop) for block_side, batch, start, stop in blocks if block_side == side]
    scales = draws.get(np.concatenate([numbers[start:stop] for _, start, stop in own]))
    batches = np.concatenate([np.full(stop - start, batch) for batch, start, stop in own])
    return scales, batches


def _frame(
    sides: dict[int, tuple[np.ndarray, np.ndarray]],
    pair,
    comparisons: Comparisons,
    statistics,
    options: DEOptions,
    var_names,
    rng,
) -> pd.DataFrame:
    """The result rows of one comparison, sorted as scvi-tools sorts them."""
    group1, group2 = pair
    use_observed_batches = not options.batch_correction
    scales1, scales2 = de.pair_samples(
        *sides[1],
        *sides[2],
        use_observed_batches=use_observed_batches,
        use_permutation=options.use_permutation,
        m_permutation=options.m_permutation,
        rng=rng,
    )
    raw = None if statistics is None else statistics.properties(group1, group2)
    where_zero = {}
    if raw is not None:
        where_zero = {
            "where_zero1": raw["raw_mean1"] < options.threshold_counts,
            "where_zero2": raw["raw_mean2"] < options.threshold_counts,
        }
    columns = de.bayes_factors(
        scales1,
        scales2,
        sides[1][0].mean(0),
        sides[2][0].mean(0),
        mode=options.mode,
        delta=options.delta,
        pseudocounts=options.pseudocounts,
        test_mode=options.test_mode,
        **where_zero,
    )
    if options.all_stats:
        assert raw is not None, "all_stats: group_statistics ran"
        columns.update(raw)
    frame = pd.DataFrame(columns, index=pd.Index(var_names))
    frame = frame.sort_values(
        by="proba_de" if options.mode == "change" else "bayes_factor", ascending=False, kind="stable"
    )
    if options.mode == "change":
        frame[f"is_de_fdr_{options.fdr_target}"] = de.fdr_de_prediction(
            frame["proba_de"].to_numpy(), fdr=options.fdr_target
        )
    if comparisons.labelled:
        group1_name = comparisons.names[group1]
        group2_name = "Rest" if group2 is None else comparisons.names[group2]
        frame["comparison"] = f"{group1_name} vs {group2_name}"
        frame["group1"] = group1_name
        frame["group2"] = group2_name
    return frame
