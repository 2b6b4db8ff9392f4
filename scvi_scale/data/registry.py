"""The field registry: which obs columns a model uses, their category lists, and per-batch library statistics.

`Registry.build` is what SCVI.setup_zarr runs on a training store; `Registry.encode` turns any store's obs columns
into the per-cell integer/float arrays the model consumes, with the same codes; `to_dict`/`from_dict` save and load
it as JSON. Conventions follow scvi-tools' AnnDataManager:
- a categorical column keeps its own category order (unused categories included); any other column is made
  categorical by pandas, which sorts the distinct values; a missing key gives a single category [0] (all cells 0);
  no value may be missing (NaN, or in a column of strings the string 'nan', which is how anndata writes a NaN
  there), or it would become a category of its own;
- library_log_means / library_log_vars: per batch, the mean and the population variance (ddof 0) of
  log(total counts) over the batch's cells, a cell with no counts contributing log = 0 (scvi-tools masks the log
  and fills 0, with a warning); a batch without cells gets mean 0 and variance 1 (scvi-tools' placeholders).
  They are computed in one streaming pass over the counts, which also validates them and, as every block read
  does (see store.py), proves the store's structure: a store that passes `build` has been read whole and intact.
- a query store whose batch column has new categories is encoded with `extend_batches`, which appends the new
  categories (sorted, as scvi-tools' extend_categories does) and computes their library statistics from the query.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from scvi_scale.data.store import CountStore, StoreError
from scvi_scale.data.validate import checked_blocks

NO_KEY_CATEGORIES = [0]  # the single category of a field not given (batch or labels), as scvi-tools registers it


def _describe_rows(store: CountStore, rows: np.ndarray, limit: int = 5) -> str:
    """'<n> row(s), e.g. rows [i, j] (cells ['a', 'b'])' for the flagged row positions."""
    shown = rows[:limit]
    names = [store.obs_names[row] for row in shown]
    return f"{len(rows)} row(s), e.g. rows {shown.tolist()} (cells {names})"


def _duplicated_obs_names(store) -> list:
    """The obs names that occur more than once (empty when they are unique), from one hash per cell read block by
    block (8 bytes a cell); only cells whose hashes collide have their names read, to tell a repeat from a
    collision."""
    hashes = store.obs_name_hashes()
    hashes.sort()
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    del hashes
    if not len(repeated):
        return []
    colliding = np.flatnonzero(np.isin(store.obs_name_hashes(), repeated))
    names = pd.Index([store.obs_names[row] for row in colliding])
    return list(names[names.duplicated()])


def _column_without_missing(store: CountStore, key: str) -> pd.Series:
    """obs[key], which must have no missing values: NaN, or the string 'nan' in a column of strings."""
    column = store.obs_column(key)
    missing = column.isna().to_numpy()
    nan_strings = np.zeros_like(missing)
    if column.dtype == object or isinstance(column.dtype, pd.StringDtype):
        nan_strings = (column == "nan").to_numpy(dtype=bool, na_value=False)
    if missing.any() or nan_strings.any():
        note = "; the string 'nan' counts as missing: it is how anndata writes a NaN of a column of strings"
        raise StoreError(
            f"{store.path}: obs column {key!r} has missing values (NaN) in "
            f"{_describe_rows(store, np.flatnonzero(missing | nan_strings))}{note if nan_strings.any() else ''}; "
            "fill them or leave those cells out"
        )
    return column


def _category_list(store: CountStore, key: str) -> list:
    """The categories of obs[key], checking it has no missing values."""
    column = _column_without_missing(store, key)
    categorical = column if isinstance(column.dtype, pd.CategoricalDtype) else column.astype("category")
    return categorical.cat.categories.tolist()


def _code_dtype(n_categories: int) -> np.dtype:
    """The narrowest signed integer type holding codes -1 ... n_categories - 1: an atlas' per-cell codes are
    10M long (int8 for up to 127 batches: 10 MB where int64 takes 80 MB)."""
    return np.result_type(np.int8, np.min_scalar_type(-max(int(n_categories), 1)))


def _codes(store: CountStore, key: str, categories: list, what: str) -> np.ndarray:
    """Codes of obs[key] in `categories` (_code_dtype); raises naming rows whose value is missing or not a
    category."""
    column = store.obs_column(key)
    dtype = _code_dtype(len(categories))
    if isinstance(column.dtype, pd.CategoricalDtype):  # map the column's own codes: no object array of 10M values
        raw = column.cat.codes.to_numpy()
        codes = pd.Index(categories).get_indexer(column.cat.categories).astype(dtype)[raw]
        missing = raw < 0
        if missing.any():
            codes[missing] = -1
    else:
        codes = pd.Categorical(column.to_numpy(), categories=categories).codes.astype(dtype)
    unknown = np.flatnonzero(codes < 0)
    if len(unknown):
        values = pd.unique(column.iloc[unknown].astype(object))[:10].tolist()
        raise StoreError(
            f"{store.path}: obs column {key!r} ({what}) has values outside the registered categories "
            f"{categories[:20]}: {values} in {_describe_rows(store, unknown)}"
        )
    return codes


def _numeric(store: CountStore, key: str, positive: bool = False) -> np.ndarray:
    """float64 values of obs[key]; raises naming rows that are not finite (or not > 0 when positive)."""
    column = store.obs_column(key)
    if not (pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype)):
        raise StoreError(f"{store.path}: obs column {key!r} must be numeric, it has dtype {column.dtype}")
    values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if positive:
        bad |= values <= 0
    if bad.any():
        need = "finite and > 0" if positive else "finite (no NaN or inf)"
        raise StoreError(
            f"{store.path}: obs column {key!r} must be {need}; it is not in "
            f"{_describe_rows(store, np.flatnonzero(bad))}"
        )
    return values


def library_log_stats(
    store: CountStore, batch_codes: np.ndarray, n_batch: int, validate: bool = True, block_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and population variance of log library size, float32 (n_batch,), in one pass over the counts.

    Blocks are merged with Chan et al.'s pairwise update of (count, mean, sum of squared deviations), in float64.
    validate: check every count on the way (CountValidationError at the first bad one).
    """
    count = np.zeros(n_batch)
    mean = np.zeros(n_batch)
    squares = np.zeros(n_batch)  # sum of squared deviations from the mean
    n_empty_cells = 0
    if validate:
        blocks = checked_blocks(store, block_rows)
    else:
        bounds = store.block_bounds(block_rows)
        blocks = ((start, stop, store.read_raw(start, stop)) for start, stop in zip(bounds[:-1], bounds[1:]))
    for start, stop, block in blocks:
        library = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        n_empty_cells += int(np.count_nonzero(library <= 0))
        log_library = np.log(library, out=np.zeros_like(library), where=library > 0)
        codes = batch_codes[start:stop]
        block_count = np.bincount(codes, minlength=n_batch).astype(np.float64)
        block_mean = np.bincount(codes, log_library, minlength=n_batch) / np.maximum(block_count, 1)
        block_squares = np.bincount(codes, (log_library - block_mean[codes]) ** 2, minlength=n_batch)
        total = count + block_count
        delta = block_mean - mean
        seen = total > 0
        mean[seen] += delta[seen] * block_count[seen] / total[seen]
        squares[seen] += block_squares[seen] + delta[seen] ** 2 * count[seen] * block_count[seen] / total[seen]
        count = total
    if n_empty_cells:
        warnings.warn(
            f"{store.path}: {n_empty_cells} cell(s) have no counts; their log library size counts as 0 "
            "(filter empty cells before training)",
            UserWarning,
            stacklevel=3,
        )
    present = count > 0
    log_means = np.where(present, mean, 0.0)
    log_vars = np.where(present, squares / np.maximum(count, 1), 1.0)
    return log_means.astype(np.float32), log_vars.astype(np.float32)


@dataclass
class Registry:
    """Registered fields of a store and what was learned from it; see the module docstring.

    Attributes: layer (counts in X when None); var_names (genes, in order); the obs keys (None / empty when not
    used) and their category lists; library_log_means / library_log_vars float32 (n_batch,); n_obs of the store
    it was built from.
    """

    var_names: list[str] = field(repr=False)  # thousands of genes: kept out of repr
    layer: str | None = None
    batch_key: str | None = None
    batch_categories: list = field(default_factory=lambda: list(NO_KEY_CATEGORIES))
    labels_key: str | None = None
    label_categories: list = field(default_factory=lambda: list(NO_KEY_CATEGORIES))
    size_factor_key: str | None = None
    categorical_covariate_keys: list[str] = field(default_factory=list)
    categorical_covariate_categories: dict[str, list] = field(default_factory=dict)
    continuous_covariate_keys: list[str] = field(default_factory=list)
    library_log_means: np.ndarray | None = field(default_factory=lambda: np.zeros(1, np.float32))
    library_log_vars: np.ndarray | None = field(default_factory=lambda: np.ones(1, np.float32))
    n_obs: int = 0
    collection: dict | None = None  # StoreCollection.describe() when set up over several stores

    @property
    def n_vars(self) -> int:
        return len(self.var_names)

    @property
    def n_batch(self) -> int:
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        return len(self.label_categories)

    @property
    def n_cats_per_cov(self) -> list[int]:
        return [len(self.categorical_covariate_categories[key]) for key in self.categorical_covariate_keys]

    @property
    def n_continuous_cov(self) -> int:
        return len(self.continuous_covariate_keys)

    @classmethod
    def build(
        cls,
        store: CountStore | str,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        *,
        layer: str | None = None,
        validate: bool = True,
        block_rows: int | None = None,
    ) -> Registry:
        """Register the fields of `store` (a CountStore, or a path opened with `layer`).

        Checks the store (at least 2 cells; unique obs names) and every column (present; nothing missing in
        categoricals; continuous finite; size factors finite and > 0), then makes one pass over the counts for the
        library statistics, which proves every block of the store and validates the counts unless validate=False.
        """
        if isinstance(store, str) or (isinstance(store, os.PathLike) and not hasattr(store, "read_raw")):
            store = CountStore(store, layer=layer)
        if store.n_obs < 2:
            raise StoreError(
                f"{store.path}: the store has {store.n_obs} cell; a model cannot train on it (training needs cells "
                "for a training and a validation set, and minibatches of at least 2 cells for BatchNorm)"
            )
        duplicated = _duplicated_obs_names(store)
        if len(duplicated):
            raise StoreError(
                f"{store.path}: {len(duplicated)} duplicated obs names (cell names), e.g. "
                f"{list(pd.unique(duplicated)[:5])}; make them unique (e.g. AnnData.obs_names_make_unique) and "
                "rewrite the store, so that every output row names one cell"
            )
        categorical_covariate_keys = list(categorical_covariate_keys or [])
        continuous_covariate_keys = list(continuous_covariate_keys or [])
        registry = cls(
            var_names=store.var_names.tolist(),
            layer=store.layer,
            batch_key=batch_key,
            batch_categories=_category_list(store, batch_key) if batch_key else list(NO_KEY_CATEGORIES),
            labels_key=labels_key,
            label_categories=_category_list(store, labels_key) if labels_key else list(NO_KEY_CATEGORIES),
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            categorical_covariate_categories={key: _category_list(store, key) for key in categorical_covariate_keys},
            continuous_covariate_keys=continuous_covariate_keys,
            n_obs=store.n_obs,
        )
        # encode checks every column (the continuous ones and size factors too); only the batch codes are kept for
        # the pass, so the other per-cell arrays (8 bytes a cell each) are not held through it
        batch_codes = registry.encode(store)["batch"]
        registry.library_log_means, registry.library_log_vars = library_log_stats(
            store, batch_codes, registry.n_batch, validate=validate, block_rows=block_rows
        )
        return registry

    def check_var_names(self, store: CountStore) -> None:
        """The store must have the registered genes in the registered order."""
        if store.n_vars != self.n_vars or not np.array_equal(store.var_names.to_numpy(), np.asarray(self.var_names)):
            names = store.var_names.tolist()
            first = next(
                (i for i, (a, b) in enumerate(zip(names, self.var_names)) if a != b), min(len(names), self.n_vars)
            )
            theirs = names[first] if first < len(names) else "end"
            ours = self.var_names[first] if first < self.n_vars else "end"
            raise StoreError(
                f"{store.path}: its {store.n_vars} var names differ from the {self.n_vars} registered ones, first at "
                f"position {first} ({theirs!r} vs {ours!r}); subset and order the genes as registered"
            )

    def encode(self, store: CountStore | str) -> dict[str, np.ndarray]:
        """Per-cell arrays aligned to the rows of `store`, coded with this registry's categories.

        Returns "batch" (N,), "labels" (N,) and "cat_covs" (N, k) integer codes (the narrowest type that holds
        them, _code_dtype: minibatches widen their share), "cont_covs" (N, c) float32, and
        "size_factor" (N,) float32 when a size_factor_key is registered. A value outside the registered categories
        raises StoreError naming it and its rows (for new batches, use extend_batches first).
        """
        if isinstance(store, str) or (isinstance(store, os.PathLike) and not hasattr(store, "read_raw")):
            store = CountStore(store, layer=self.layer)
        self.check_var_names(store)
        n_obs = store.n_obs

        def coded(key, categories, what):
            return _codes(store, key, categories, what) if key else np.zeros(n_obs, dtype=np.int8)

        encoded = {
            "batch": coded(self.batch_key, self.batch_categories, "batch"),
            "labels": coded(self.labels_key, self.label_categories, "labels"),
            "cat_covs": np.stack(
                [
                    coded(key, self.categorical_covariate_categories[key], "categorical covariate")
                    for key in self.categorical_covariate_keys
                ],
                axis=1,
            )
            if self.categorical_covariate_keys
            else np.zeros((n_obs, 0), dtype=np.int8),
            "cont_covs": np.stack([_numeric(store, key) for key in self.continuous_covariate_keys], axis=1).astype(
                np.float32
            )
            if self.continuous_covariate_keys
            else np.zeros((n_obs, 0), dtype=np.float32),
        }
        if self.size_factor_key:
            encoded["size_factor"] = _numeric(store, self.size_factor_key, positive=True).astype(np.float32)
        return encoded

    def extend_batches(self, query: CountStore | str, validate: bool = True) -> Registry:
        """A registry whose batch categories also cover the query's new ones, for encoding a query store.

        New categories (values of the query's batch column not registered) are appended sorted; registered batches
        keep their library statistics, new ones get theirs from the query (one pass, validating unless told not
        to). Labels and categorical covariates must stay within the registered categories.
        """
        if isinstance(query, str) or (isinstance(query, os.PathLike) and not hasattr(query, "read_raw")):
            query = CountStore(query, layer=self.layer)
        if self.batch_key is None:
            raise StoreError("the registry has no batch_key, so there are no batch categories to extend")
        self.check_var_names(query)
        column = _column_without_missing(query, self.batch_key)
        registered = set(self.batch_categories)
        new_categories = sorted(value for value in pd.unique(column.astype(object)) if value not in registered)
        extended = replace(self, batch_categories=list(self.batch_categories) + new_categories)
        batch_codes = _codes(query, self.batch_key, extended.batch_categories, "batch")
        query_means, query_vars = library_log_stats(query, batch_codes, extended.n_batch, validate=validate)
        n_old = self.n_batch
        extended.library_log_means = np.concatenate([self.library_log_means, query_means[n_old:]])
        extended.library_log_vars = np.concatenate([self.library_log_vars, query_vars[n_old:]])
        return extended

    # --- persistence -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (lists, strings, numbers) holding everything; inverse of from_dict."""
        return {
            "var_names": list(self.var_names),
            "layer": self.layer,
            "batch_key": self.batch_key,
            "batch_categories": list(self.batch_categories),
            "labels_key": self.labels_key,
            "label_categories": list(self.label_categories),
            "size_factor_key": self.size_factor_key,
            "categorical_covariate_keys": list(self.categorical_covariate_keys),
            "categorical_covariate_categories": {
                key: list(values) for key, values in self.categorical_covariate_categories.items()
            },
            "continuous_covariate_keys": list(self.continuous_covariate_keys),
            "library_log_means": np.asarray(self.library_log_means, dtype=np.float32).tolist(),
            "library_log_vars": np.asarray(self.library_log_vars, dtype=np.float32).tolist(),
            "n_obs": int(self.n_obs),
            "collection": self.collection,
        }

    @classmethod
    def from_dict(cls, state: dict) -> Registry:
        fields = dict(state)
        for key in ("library_log_means", "library_log_vars"):
            fields[key] = np.asarray(fields[key], dtype=np.float32)
        return cls(**fields)
