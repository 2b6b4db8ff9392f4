"""Registry: categories, encodings and library statistics equal a direct in-memory computation (scvi-tools'
rules written out with numpy/pandas), survive JSON, extend to a query's new batches, and bad columns fail with
the rows named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_scale.data import CountStore, CountValidationError, Registry, StoreError, write_store

CELLBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cellbench_3cl.h5ad"

pytestmark = pytest.mark.filterwarnings("ignore:.*zarr v2 data will no longer be the default.*")


def direct_library_stats(counts, batch_codes, n_batch):
    """scvi-tools' rule in float64: per batch, mean and population variance of log library size (log 0 -> 0)."""
    library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    log_library = np.where(library > 0, np.log(np.where(library > 0, library, 1)), 0.0)
    means, variances = np.zeros(n_batch), np.ones(n_batch)
    for batch in np.unique(batch_codes):
        means[batch] = log_library[batch_codes == batch].mean()
        variances[batch] = log_library[batch_codes == batch].var()
    return means, variances


def make_adata(n_obs=400, n_vars=30, seed=0, batches=("s1", "s3", "s2")) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(2, 0.3, size=(n_obs, n_vars)).astype(np.float32)
    counts *= rng.exponential(1.0, (n_obs, 1)).round() + 1  # spread the library sizes
    obs = pd.DataFrame(
        {
            "study": rng.choice(list(batches), n_obs).astype(object),  # plain strings: categories sorted
            "cell_type": pd.Categorical(rng.choice(["T", "B"], n_obs), categories=["T", "B", "NK"]),
            "donor": pd.Categorical(rng.choice(["d2", "d1"], n_obs), categories=["d2", "d1"]),
            "percent_mito": rng.uniform(0, 10, n_obs),
            "size_factor": rng.uniform(0.5, 2.0, n_obs),
        },
        index=[f"c{seed}_{i}" for i in range(n_obs)],
    )
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]))


@pytest.fixture
def store(tmp_path) -> tuple[CountStore, ad.AnnData]:
    adata = make_adata()
    return write_store(adata, tmp_path / "s.zarr", chunk_rows=64), adata


def test_real_data_batches_labels_and_library_stats(tmp_path):
    if not CELLBENCH.exists():
        pytest.skip(f"real data not found at {CELLBENCH}")
    shutil.copy(CELLBENCH, tmp_path / "cb.h5ad")
    adata = ad.read_h5ad(tmp_path / "cb.h5ad")
    store = write_store(tmp_path / "cb.h5ad", tmp_path / "cb.zarr", chunk_rows=100)
    registry = Registry.build(store, batch_key="batch", labels_key="cell_line")
    assert registry.batch_categories == list(adata.obs["batch"].cat.categories)
    assert registry.label_categories == list(adata.obs["cell_line"].cat.categories)
    encoded = registry.encode(store)
    np.testing.assert_array_equal(encoded["batch"], adata.obs["batch"].cat.codes)
    np.testing.assert_array_equal(encoded["labels"], adata.obs["cell_line"].cat.codes)
    means, variances = direct_library_stats(adata.X, encoded["batch"], registry.n_batch)
    np.testing.assert_allclose(registry.library_log_means, means, rtol=1e-6)
    np.testing.assert_allclose(registry.library_log_vars, variances, rtol=1e-5)


def test_encode_matches_pandas_and_stats_do_not_depend_on_blocks(store):
    store, adata = store
    registry = Registry.build(
        store,
        batch_key="study",
        labels_key="cell_type",
        size_factor_key="size_factor",
        categorical_covariate_keys=["donor", "study"],
        continuous_covariate_keys=["percent_mito", "size_factor"],
        block_rows=64,
    )
    assert registry.batch_categories == ["s1", "s2", "s3"]  # a plain column: pandas' sorted categories
    assert registry.label_categories == ["T", "B", "NK"]  # a categorical keeps its order and unused categories
    assert registry.n_cats_per_cov == [2, 3] and registry.n_continuous_cov == 2 and registry.n_labels == 3
    encoded = registry.encode(store)
    obs = adata.obs
    np.testing.assert_array_equal(encoded["batch"], obs["study"].astype("category").cat.codes)
    np.testing.assert_array_equal(encoded["labels"], obs["cell_type"].cat.codes)
    np.testing.assert_array_equal(
        encoded["cat_covs"], np.stack([obs["donor"].cat.codes, obs["study"].astype("category").cat.codes], axis=1)
    )
    np.testing.assert_array_equal(encoded["cont_covs"], obs[["percent_mito", "size_factor"]].to_numpy(np.float32))
    np.testing.assert_array_equal(encoded["size_factor"], obs["size_factor"].to_numpy(np.float32))
    assert {key: value.dtype for key, value in encoded.items()} == {
        "batch": np.int8,
        "labels": np.int8,
        "cat_covs": np.int8,
        "cont_covs": np.float32,
        "size_factor": np.float32,
    }  # codes as narrow as their categories allow (-1 ... n - 1): an atlas holds them per cell
    means, variances = direct_library_stats(adata.X, encoded["batch"], 3)
    np.testing.assert_allclose(registry.library_log_means, means, rtol=1e-6)
    np.testing.assert_allclose(registry.library_log_vars, variances, rtol=1e-5)
    one_block = Registry.build(store, batch_key="study", block_rows=400)
    seven_rows = Registry.build(store, batch_key="study", block_rows=7)
    np.testing.assert_allclose(one_block.library_log_vars, seven_rows.library_log_vars, rtol=1e-5)
    np.testing.assert_allclose(one_block.library_log_means, registry.library_log_means, rtol=1e-6)


def test_no_keys_give_single_categories_and_global_stats(store):
    store, adata = store
    registry = Registry.build(store)
    encoded = registry.encode(store)
    assert registry.n_batch == 1 and registry.n_labels == 1
    assert not encoded["batch"].any() and not encoded["labels"].any()
    assert encoded["cat_covs"].shape == (400, 0) and encoded["cont_covs"].shape == (400, 0)
    means, variances = direct_library_stats(adata.X, np.zeros(400, dtype=int), 1)
    np.testing.assert_allclose(registry.library_log_means, means, rtol=1e-6)
    np.testing.assert_allclose(registry.library_log_vars, variances, rtol=1e-5)


@pytest.mark.parametrize("n_batches", [128, 129, 40_000])
def test_codes_are_as_narrow_as_their_categories_and_minibatches_widen_them(tmp_path, n_batches):
    """128 batches fit int8 (codes -1 ... 127), 129 need int16, 40,000 int32; every code survives, and a
    minibatch hands the module int64 codes."""
    from scvi_scale.sampler import SequentialSampler

    names = [f"b{i:05d}" for i in range(n_batches)]
    adata = make_adata(n_obs=max(400, n_batches), batches=names)
    adata.obs["study"] = pd.Categorical(adata.obs["study"], categories=names)
    store = write_store(adata, tmp_path / "s.zarr", chunk_rows=4096)
    registry = Registry.build(store, batch_key="study")
    codes = registry.encode(store)["batch"]
    assert codes.dtype == {128: np.int8, 129: np.int16, 40_000: np.int32}[n_batches]
    np.testing.assert_array_equal(codes, adata.obs["study"].cat.codes)
    minibatch = next(iter(SequentialSampler(store, batch_size=len(codes), obs_arrays={"batch": codes})))
    assert minibatch["batch"].dtype == np.int64
    np.testing.assert_array_equal(minibatch["batch"], adata.obs["study"].cat.codes)


def test_empty_cells_and_empty_batches_follow_scvi_tools(tmp_path):
    adata = make_adata()
    counts = adata.X.toarray()
    counts[[3, 10]] = 0
    adata.X = sp.csr_matrix(counts)
    adata.obs["study"] = pd.Categorical(adata.obs["study"], categories=["s1", "s2", "s3", "never"])
    store = write_store(adata, tmp_path / "s.zarr", chunk_rows=64)
    with pytest.warns(UserWarning, match="2 cell"):
        registry = Registry.build(store, batch_key="study")
    means, variances = direct_library_stats(adata.X, registry.encode(store)["batch"], 4)
    np.testing.assert_allclose(registry.library_log_means, means, rtol=1e-6)
    np.testing.assert_allclose(registry.library_log_vars, variances, rtol=1e-5)
    assert registry.library_log_means[3] == 0 and registry.library_log_vars[3] == 1


def test_json_round_trip(store):
    store, _ = store
    registry = Registry.build(
        store,
        batch_key="study",
        labels_key="cell_type",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["percent_mito"],
        size_factor_key="size_factor",
    )
    restored = Registry.from_dict(json.loads(json.dumps(registry.to_dict())))
    assert restored.to_dict() == registry.to_dict()
    for key, values in registry.encode(store).items():
        np.testing.assert_array_equal(restored.encode(store)[key], values)
    np.testing.assert_array_equal(restored.library_log_vars, registry.library_log_vars)


def test_query_with_new_batches(tmp_path):
    reference = write_store(make_adata(seed=0, batches=("s1", "s2")), tmp_path / "ref.zarr")
    query_adata = make_adata(seed=1, n_obs=150, batches=("s2", "z9", "a0"))
    query = write_store(query_adata, tmp_path / "query.zarr", chunk_rows=40)
    registry = Registry.build(reference, batch_key="study", labels_key="cell_type")
    with pytest.raises(StoreError, match=r"outside the registered categories \['s1', 's2'\].*'z9'.*rows \["):
        registry.encode(query)
    extended = registry.extend_batches(query)
    assert extended.batch_categories == ["s1", "s2", "a0", "z9"]
    assert registry.batch_categories == ["s1", "s2"]  # the reference registry is left as it was
    codes = extended.encode(query)["batch"]
    np.testing.assert_array_equal(codes, query_adata.obs["study"].map({"s1": 0, "s2": 1, "a0": 2, "z9": 3}).to_numpy())
    means, variances = direct_library_stats(query_adata.X, codes, 4)
    np.testing.assert_allclose(extended.library_log_means[:2], registry.library_log_means)
    np.testing.assert_allclose(extended.library_log_means[2:], means[2:], rtol=1e-6)
    np.testing.assert_allclose(extended.library_log_vars[2:], variances[2:], rtol=1e-5)


def test_bad_columns_name_their_rows(tmp_path):
    adata = make_adata()
    adata.obs["study"] = adata.obs["study"].astype("category")
    adata.obs.loc[["c0_5", "c0_9"], "study"] = np.nan
    adata.obs.loc["c0_7", "percent_mito"] = np.nan
    adata.obs.loc["c0_8", "size_factor"] = 0.0
    store = write_store(adata, tmp_path / "s.zarr")
    with pytest.raises(
        StoreError,
        match=r"'study' has missing values \(NaN\) in 2 row\(s\), e.g. rows \[5, 9\] "
        r"\(cells \['c0_5', 'c0_9'\]\)",
    ):
        Registry.build(store, batch_key="study")
    with pytest.raises(StoreError, match=r"'percent_mito' must be finite .* rows \[7\] \(cells \['c0_7'\]\)"):
        Registry.build(store, continuous_covariate_keys=["percent_mito"])
    with pytest.raises(StoreError, match=r"'size_factor' must be finite and > 0.* rows \[8\]"):
        Registry.build(store, size_factor_key="size_factor")
    with pytest.raises(StoreError, match=r"no column 'batch'; its columns are \['study'"):
        Registry.build(store, batch_key="batch")
    with pytest.raises(StoreError, match="'cell_type' must be numeric"):
        Registry.build(store, continuous_covariate_keys=["cell_type"])


def test_build_validates_counts_in_its_pass(tmp_path):
    adata = make_adata()
    counts = adata.X.toarray()
    counts[201, 4] = 0.5
    adata.X = sp.csr_matrix(counts)
    store = write_store(adata, tmp_path / "s.zarr", chunk_rows=100, validate=False)
    with pytest.raises(CountValidationError, match=r"integer-valued, but row 201 \(cell 'c0_201'\)"):
        Registry.build(store, batch_key="study")
    Registry.build(store, batch_key="study", validate=False)


def test_encode_requires_the_registered_genes(tmp_path, store):
    store, adata = store
    registry = Registry.build(store)
    renamed = adata.copy()
    renamed.var_names = [f"g{i}" for i in range(29)] + ["other"]
    other = write_store(renamed, tmp_path / "other.zarr")
    with pytest.raises(StoreError, match=r"first at position 29 \('other' vs 'g29'\)"):
        registry.encode(other)


def test_a_store_of_one_cell_is_refused(tmp_path):
    store = write_store(make_adata(n_obs=1), tmp_path / "one.zarr")
    with pytest.raises(StoreError, match="has 1 cell; a model cannot train on it"):
        Registry.build(store)


def test_duplicated_obs_names_are_refused(tmp_path):
    adata = make_adata()
    adata.obs_names = [f"c{i % 390}" for i in range(400)]  # c0 .. c9 twice
    store = write_store(adata, tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"10 duplicated obs names \(cell names\), e.g. \['c0', 'c1', 'c2', 'c3'"):
        Registry.build(store, batch_key="study")


@pytest.mark.parametrize("role", ["batch_key", "labels_key", "categorical_covariate_keys"])
def test_nan_written_as_a_string_is_refused_naming_the_rows(tmp_path, role):
    """anndata writes a NaN of an object column as the string 'nan' (a store written by anndata.io.write_elem, as
    older scvi-scale did): registered, it would be a batch of its own."""
    adata = make_adata()
    study = adata.obs["study"].to_numpy().copy()
    study[[12, 301]] = np.nan
    adata.obs["study"] = study
    adata.write_zarr(tmp_path / "a.zarr", convert_strings_to_categoricals=False)
    assert list(ad.read_zarr(tmp_path / "a.zarr").obs["study"].iloc[[12, 301]]) == ["nan", "nan"]
    key = ["study"] if role == "categorical_covariate_keys" else "study"
    with pytest.raises(
        StoreError,
        match=r"'study' has missing values \(NaN\) in 2 row\(s\), e.g. rows \[12, 301\] "
        r"\(cells \['c0_12', 'c0_301'\]\); the string 'nan' counts as missing",
    ):
        Registry.build(tmp_path / "a.zarr", **{role: key})
