"""Synthetic atlas: reproducible from its seed (independently of chunk_rows), with the structure it promises:
~90% zeros, libraries of a few thousand UMIs, contiguous batches, cell types that their planted markers separate
with the recorded fold changes, a covariate that drives its gene programme."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import stats

from scvi_scale.datasets import negative_binomial_csr, synthetic_atlas

pytestmark = pytest.mark.filterwarnings("ignore:.*zarr v2 data will no longer be the default.*")


# Both paths for the non-zero entries: CDF inversion (mean <= INVERSION_MAX_MEAN = 4; (3.5, 0.07) walks far into
# a heavy tail) and gamma-Poisson repeated until positive (larger means; (4.5, 0.07) has P(0) ~ 0.74).
@pytest.mark.parametrize(
    ("mean", "theta"),
    [(0.05, 0.3), (0.8, 0.3), (3.5, 0.07), (4.5, 0.07), (6.0, 0.5), (40.0, 2.0), (300.0, 0.2)],
)
def test_negative_binomial_sampler_matches_scipy(mean, theta):
    n = 200_000
    draws = negative_binomial_csr(np.random.default_rng(11), np.full((n, 1), mean), np.array([theta]))
    values = draws.toarray().ravel()
    assert draws.dtype == np.float32 and np.all(draws.data > 0)
    reference = stats.nbinom(theta, theta / (theta + mean))  # scipy's (n, p) parametrisation
    support = np.arange(10)
    empirical = np.array([(values == k).mean() for k in support])
    np.testing.assert_allclose(empirical, reference.pmf(support), atol=4 * np.sqrt(0.25 / n))
    for k in (10, 30, 100, 300):  # the tail, where a CDF walk stopping early would show
        tail = reference.sf(k - 1)
        assert abs((values >= k).mean() - tail) <= 5 * np.sqrt(tail * (1 - tail) / n) + 1e-5, k
    assert abs(values.mean() - mean) < 5 * reference.std() / np.sqrt(n)


def test_negative_binomial_entries_are_independent_of_their_neighbours():
    """Entries of many means in one matrix (so both paths at once, interleaved) each follow their own NB."""
    rng = np.random.default_rng(5)
    means = np.array([0.01, 0.5, 3.9, 4.1, 25.0, 150.0])
    thetas = np.array([0.3, 0.1, 0.5, 0.07, 1.0, 0.2])
    n = 60_000
    values = negative_binomial_csr(rng, np.tile(means, (n, 1)).astype(np.float32), thetas).toarray()
    for column, (mean, theta) in enumerate(zip(means, thetas)):
        reference = stats.nbinom(theta, theta / (theta + mean))
        for k in (0, 1, 2, 5):
            expected = reference.pmf(k)
            assert abs((values[:, column] == k).mean() - expected) <= 5 * np.sqrt(expected * (1 - expected) / n)
        assert abs(values[:, column].mean() - mean) < 5 * reference.std() / np.sqrt(n)


def x_arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")["X"]
    return {name: group[name][:] for name in ("data", "indices", "indptr")}


def test_same_seed_same_arrays_whatever_the_chunking(tmp_path):
    first = synthetic_atlas(tmp_path / "a.zarr", 2500, seed=7, chunk_rows=500)
    synthetic_atlas(tmp_path / "b.zarr", 2500, seed=7, chunk_rows=500)
    rechunked = synthetic_atlas(tmp_path / "c.zarr", 2500, seed=7, chunk_rows=1100)
    other_seed = synthetic_atlas(tmp_path / "d.zarr", 2500, seed=8, chunk_rows=500)
    assert rechunked.chunk_rows == 1100 and first.chunk_rows == 500
    reference = x_arrays(tmp_path / "a.zarr")
    for path in ("b.zarr", "c.zarr"):
        arrays = x_arrays(tmp_path / path)
        for name, values in reference.items():
            assert arrays[name].tobytes() == values.tobytes(), (path, name)
    pd.testing.assert_frame_equal(ad.read_zarr(tmp_path / "a.zarr").obs, ad.read_zarr(tmp_path / "c.zarr").obs)
    assert x_arrays(tmp_path / "d.zarr")["data"].tobytes() != reference["data"].tobytes()
    assert not first.obs_column("cell_type").equals(other_seed.obs_column("cell_type"))


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> ad.AnnData:
    path = tmp_path_factory.mktemp("atlas") / "atlas.zarr"
    synthetic_atlas(path, 8000, n_batches=4, n_cell_types=8, seed=3)
    return ad.read_zarr(path)


def test_sparsity_libraries_and_obs(atlas):
    counts = atlas.X
    assert atlas.shape == (8000, 2000)
    assert 0.85 <= 1 - counts.nnz / np.prod(counts.shape) <= 0.95
    np.testing.assert_array_equal(counts.data, np.round(counts.data))
    library = np.asarray(counts.sum(axis=1)).ravel()
    assert 1000 <= np.median(library) <= 5000
    log_library = np.log(library)
    assert 0.2 <= log_library.std() <= 0.8  # log-normal spread LIBRARY_LOG_SD = 0.4 plus batch shifts
    obs = atlas.obs
    assert list(obs.columns) == ["batch", "cell_type", "cycling_score"]
    assert list(obs["batch"].cat.categories) == ["batch_0", "batch_1", "batch_2", "batch_3"]
    assert list(obs["cell_type"].cat.categories) == [f"type_{i}" for i in range(8)]
    np.testing.assert_array_equal(obs["batch"].cat.codes, np.arange(8000) * 4 // 8000)  # contiguous runs
    assert set(obs["cell_type"].cat.codes) == set(range(8))
    assert abs(obs["cycling_score"].mean()) < 0.1 and abs(obs["cycling_score"].std() - 1) < 0.1


def test_markers_have_the_recorded_fold_changes_and_separate_types(atlas):
    normalized = atlas.X.toarray() / np.asarray(atlas.X.sum(axis=1))
    cell_types = atlas.obs["cell_type"].cat.codes.to_numpy()
    marker_of = atlas.var["marker_of"].cat.codes.to_numpy()
    estimated, recorded = [], []
    for cell_type in range(8):
        genes = marker_of == cell_type
        assert genes.sum() == 20
        inside = normalized[cell_types == cell_type][:, genes].mean(axis=0)
        others = np.mean(
            [normalized[cell_types == other][:, genes].mean(axis=0) for other in range(8) if other != cell_type], axis=0
        )
        estimated.append(np.log2(inside / others))
        recorded.append(atlas.var["marker_lfc"].to_numpy()[genes])
    estimated, recorded = np.concatenate(estimated), np.concatenate(recorded)
    assert np.all((recorded > 0.5) & (recorded < 3.5))
    assert np.corrcoef(estimated, recorded)[0, 1] > 0.9
    assert np.mean(np.abs(estimated - recorded)) < 0.3
    # nearest centroid on the log-normalised markers recovers the cell types
    markers = np.log1p(normalized[:, marker_of >= 0] * 1e4)
    centroids = np.stack([markers[cell_types == t].mean(axis=0) for t in range(8)])
    predicted = np.argmin(((markers[:, None, :] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    assert (predicted == cell_types).mean() > 0.75


def test_ground_truth_scale_and_covariate_programme(atlas):
    truth = atlas.uns["synthetic_atlas"]["true_log2_scale"]
    assert truth.shape == (8, 2000)
    np.testing.assert_allclose((2.0**truth).sum(axis=1), 1.0, rtol=1e-10)
    cycling = atlas.var["cycling_coef"].to_numpy() > 0
    assert cycling.sum() == 40 and not np.any(cycling & atlas.var["marker_of"].notna().to_numpy())
    counts = atlas.X.toarray()
    cycling_share = np.log((counts[:, cycling].sum(axis=1) + 1) / counts.sum(axis=1))
    assert np.corrcoef(atlas.obs["cycling_score"], cycling_share)[0, 1] > 0.5


def test_small_gene_counts_get_fewer_markers_and_explicit_excess_is_an_error(tmp_path):
    small = synthetic_atlas(tmp_path / "small.zarr", 300, n_genes=300, n_cell_types=4)
    var = small.var_frame()
    markers_per_type = var["marker_of"].value_counts()
    assert len(markers_per_type) == 4 and markers_per_type.nunique() == 1 and 1 <= markers_per_type.iloc[0] < 20
    assert 1 <= (var["cycling_coef"] > 0).sum() < 40
    with pytest.raises(ValueError, match="8 cell types x 20 markers .* n_genes=200"):
        synthetic_atlas(tmp_path / "s.zarr", 100, n_genes=200, markers_per_type=20)
    assert not (tmp_path / "s.zarr").exists()


def test_library_median_scales_the_libraries(tmp_path):
    default = ad.read_zarr(synthetic_atlas(tmp_path / "default.zarr", 3000, seed=2).path)
    deeper = ad.read_zarr(synthetic_atlas(tmp_path / "deeper.zarr", 3000, seed=2, library_median=6000.0).path)
    ratio = np.median(np.asarray(deeper.X.sum(axis=1))) / np.median(np.asarray(default.X.sum(axis=1)))
    assert 2.5 < ratio < 3.5 and deeper.X.nnz > default.X.nnz
    assert deeper.uns["synthetic_atlas"]["library_median"] == 6000.0
    with pytest.raises(ValueError, match="library_median must be positive"):
        synthetic_atlas(tmp_path / "bad.zarr", 10, library_median=0)
