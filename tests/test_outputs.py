"""Chunked outputs written back to Zarr: writer guarantees, chunked == at once, DE on planted markers, posterior
predictive moments, resume after a crash, dask workers, the command line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import zarr
from scipy import stats

from scvi_scale import SCVI
from scvi_scale.data import write_store
from scvi_scale.datasets import synthetic_atlas
from scvi_scale.outputs import (
    OutputError,
    OutputIncompleteError,
    output_store,
    read_output,
    runner,
    write_obsm,
    write_uns,
)
from scvi_scale.outputs import writer as writer_module
from scvi_scale.outputs.noise import LONG_NORMAL_SEQUENCE, CellNoise, invert_counts
from scvi_scale.outputs.writer import CsrOutput, DenseOutput, progress_folder

N_CELLS, N_GENES, CHUNK_ROWS = 1200, 600, 256


def store_files(path: Path, below: str) -> dict[str, str]:
    """sha256 of every file under path/below, by relative path."""
    return {
        str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted((path / below).rglob("*"))
        if file.is_file()
    }


def dense_counts(path) -> np.ndarray:
    x = anndata.read_zarr(path).X
    return x.toarray() if sp.issparse(x) else np.asarray(x)


# --- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("outputs") / "atlas.zarr"
    synthetic_atlas(
        path,
        n_cells=N_CELLS,
        n_genes=N_GENES,
        n_batches=2,
        n_cell_types=3,
        markers_per_type=6,
        chunk_rows=CHUNK_ROWS,
        seed=11,
    )
    return path


@pytest.fixture(scope="module")
def model(atlas) -> SCVI:
    """A ZINB model trained briefly (enough for the planted markers to stand out)."""
    SCVI.setup_zarr(atlas, batch_key="batch")
    trained = SCVI(atlas, n_latent=8, n_hidden=64)
    trained.train(max_epochs=20, batch_size=128, plan_kwargs={"n_epochs_kl_warmup": 5}, seed=0)
    return trained


@pytest.fixture
def scratch_store(tmp_path) -> Path:
    path = tmp_path / "small.zarr"
    synthetic_atlas(
        path, n_cells=300, n_genes=600, n_batches=2, n_cell_types=3, markers_per_type=6, chunk_rows=128, seed=5
    )
    return path


# --- the writer ----------------------------------------------------------------------------------------------------


def test_dense_output_resumes_refuses_and_completes(scratch_store):
    values = np.random.default_rng(0).random((300, 7)).astype(np.float32)
    output = DenseOutput(str(scratch_store), "obsm", "X_test", 300, 7, 128, {"method": "test"})
    assert output.prepare() == [0, 1, 2]
    output.write_chunk(1, values[128:256])
    with pytest.raises(OutputIncompleteError, match="1 of 3 chunks"):
        read_output(scratch_store, "obsm/X_test")
    assert "X_test" not in anndata.read_zarr(scratch_store).obsm  # staged outside the store until it is whole
    assert output.prepare() == [0, 2]  # the same settings resume
    with pytest.raises(OutputError, match="other settings"):
        DenseOutput(str(scratch_store), "obsm", "X_test", 300, 7, 128, {"method": "other"}).prepare()
    for chunk in (2, 0):
        output.write_chunk(chunk, values[slice(*output.bounds(chunk))])
    output.finish()
    np.testing.assert_array_equal(read_output(scratch_store, "obsm/X_test").compute(), values)
    np.testing.assert_array_equal(anndata.read_zarr(scratch_store).obsm["X_test"], values)
    with pytest.raises(OutputError, match="already exists"):
        output.prepare()
    assert output.prepare(overwrite=True) == [0, 1, 2]
    assert not list(scratch_store.parent.glob(".*progress*/obsm/X_test/*.done"))


def test_csr_output_is_assembled_in_row_order(scratch_store):
    values = sp.random(300, 600, density=0.05, format="csr", dtype=np.float32, random_state=1)
    output = CsrOutput(str(scratch_store), "layers", "sampled", 300, 600, 128, {})
    for chunk in reversed(output.prepare()):
        output.write_chunk(chunk, values[slice(*output.bounds(chunk))])
    with pytest.raises(OutputIncompleteError):
        read_output(scratch_store, "layers/sampled")
    assert "sampled" not in anndata.read_zarr(scratch_store).layers  # not there until assembled
    output.finish()
    layer = anndata.read_zarr(scratch_store).layers["sampled"]
    assert sp.issparse(layer) and (layer != values).nnz == 0
    assert layer.indptr.dtype == layer.indices.dtype == np.int32  # as anndata writes (see test_data)
    assert (read_output(scratch_store, "layers/sampled").compute() != values).nnz == 0


def test_csr_assembly_across_many_zarr_chunks_is_exact(scratch_store, monkeypatch):
    """Zarr chunks far smaller than a piece and not aligned with pieces (the assembly writes whole chunks only)."""
    monkeypatch.setattr(writer_module, "CSR_VALUES_CHUNK", 7)
    monkeypatch.setattr(writer_module, "INDPTR_CHUNK_BLOCKS", 1)
    rows_kept = np.ones(300, dtype=np.float32)
    rows_kept[100:140] = 0  # empty rows, and a piece with few values
    values = sp.csr_matrix(sp.diags(rows_kept) @ sp.random(300, 600, density=0.05, dtype=np.float32, random_state=2))
    values.eliminate_zeros()
    output = CsrOutput(str(scratch_store), "layers", "many_chunks", 300, 600, 128, {})
    for chunk in output.prepare():
        output.write_chunk(chunk, values[slice(*output.bounds(chunk))])
    output.finish()
    layer = anndata.read_zarr(scratch_store).layers["many_chunks"]
    assert np.array_equal(layer.indptr, values.indptr) and np.array_equal(layer.indices, values.indices)
    assert np.array_equal(layer.data, values.data)


def test_writer_never_touches_x_or_existing_entries(scratch_store):
    before = {name: store_files(scratch_store, name) for name in ("X", "obs", "var")}
    write_obsm(scratch_store, "X_small", np.ones((300, 2)))
    with pytest.raises(OutputError, match="already exists"):
        write_obsm(scratch_store, "X_small", np.zeros((300, 2)))
    write_uns(scratch_store, "table", pd.DataFrame({"a": [1.0, 2.0]}, index=["g1", "g1"]))
    with pytest.raises(OutputError, match="not 'X'|X is never written"):
        DenseOutput(str(scratch_store), "X", "data", 300, 1, 128)
    with pytest.raises(OutputError, match="one row per cell"):
        write_obsm(scratch_store, "X_bad", np.ones((10, 2)))
    after = {name: store_files(scratch_store, name) for name in ("X", "obs", "var")}
    assert before == after
    adata = anndata.read_zarr(scratch_store)
    assert adata.obsm["X_small"].shape == (300, 2) and adata.uns["table"]["a"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_separate_output_store_is_a_valid_anndata_store(tmp_path, zarr_format):
    """The new store holds the input's obs and var (a local input's files copied) in the input's Zarr format, and
    not what a killed obs-column write left in the input's obs folder."""
    scratch_store = tmp_path / "small.zarr"
    synthetic_atlas(scratch_store, n_cells=300, n_genes=600, n_batches=2, n_cell_types=3, zarr_format=zarr_format)
    leftover = scratch_store / "obs" / ".score.partial-0123456789ab"
    leftover.mkdir()
    (leftover / "zarr.json").write_text("{}")
    target = output_store(scratch_store, tmp_path / "outputs.zarr")
    assert zarr.open_group(str(target), mode="r").metadata.zarr_format == zarr_format
    assert not (Path(target) / "obs" / leftover.name).exists()
    write_obsm(target, "X_new", np.arange(600).reshape(300, 2))
    adata, source = anndata.read_zarr(target), anndata.read_zarr(scratch_store)
    assert adata.X is None and adata.obsm["X_new"][299, 1] == 599
    pd.testing.assert_frame_equal(adata.obs, source.obs)
    pd.testing.assert_frame_equal(adata.var, source.var)
    assert "X_new" not in source.obsm
    assert output_store(scratch_store, target) == str(target)  # reopening checks and reuses it


# --- counts drawn by inversion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [None, 0.05, 0.4, 30.0])
@pytest.mark.parametrize("dropout", [None, 0.3])
def test_inverted_counts_follow_the_zinb_nb_and_poisson(theta, dropout):
    mean = np.array([0.02, 0.7, 4.0, 60.0], dtype=np.float32)
    n_draws = 40_000
    uniform = CellNoise(3, np.arange(n_draws)).uniform(0, len(mean))
    shape = (n_draws, len(mean))
    counts = invert_counts(
        uniform,
        np.broadcast_to(mean, shape).copy(),
        None if theta is None else np.full(len(mean), theta, np.float32),
        None if dropout is None else np.full(shape, dropout, np.float32),
    ).toarray()
    for gene, mu in enumerate(mean.astype(np.float64)):
        law = stats.poisson(mu) if theta is None else stats.nbinom(theta, theta / (theta + mu))
        keep = 1.0 if dropout is None else 1.0 - dropout  # a zero-inflated law: 0 w.p. dropout, else the law

        def cdf(values):
            return (1.0 - keep) + keep * law.cdf(values)

        mean_ = keep * law.mean()
        variance = keep * (law.var() + law.mean() ** 2) - mean_**2
        draws = counts[:, gene]
        assert abs(draws.mean() - mean_) < 5 * np.sqrt(variance / n_draws)
        values = np.arange(int(law.ppf(0.99)) + 1)  # the empirical CDF against the law's, up to its 99th percentile
        empirical = (draws[:, None] <= values[None, :]).mean(0)
        assert np.abs(empirical - cdf(values)).max() < 5 * 0.5 / np.sqrt(n_draws)


@pytest.mark.parametrize("shape", [(3, 4), (1, 7), (2, LONG_NORMAL_SEQUENCE // 2 + 1)])  # the last: Philox
def test_cell_noise_depends_only_on_seed_stream_and_cell(shape):
    everything = CellNoise(7, np.arange(100)).normal(2, shape)
    some = CellNoise(7, np.array([42, 3])).normal(2, shape)
    np.testing.assert_array_equal(some, everything[[42, 3]])
    assert not np.allclose(CellNoise(8, np.arange(100)).normal(2, shape), everything)
    assert not np.allclose(CellNoise(7, np.arange(100)).normal(1, shape), everything)
    # standard normal, independent across cells and across a cell's draws
    values = CellNoise(7, np.arange(20_000)).normal(2, shape).reshape(20_000, -1)
    assert stats.kstest(values.ravel(), "norm").pvalue > 1e-3
    assert abs(np.corrcoef(values[:-1, 0], values[1:, 0])[0, 1]) < 5 / np.sqrt(20_000)
    assert abs(np.corrcoef(values[:, 0], values[:, -1])[0, 1]) < 5 / np.sqrt(20_000)


# --- chunked equals at once -----------------------------------------------------------------------------------------


def test_written_outputs_equal_outputs_computed_at_once(model, atlas):
    at_once = dict(chunk_rows=N_CELLS, batch_size=128)  # one chunk holding every cell
    latent = model.write_latent_representation(overwrite=True)
    np.testing.assert_allclose(latent.compute(), model.get_latent_representation(), rtol=1e-5, atol=1e-6)

    written = model.get_normalized_expression(write_to="scvi_normalized", seed=3, batch_size=128, overwrite=True)
    in_memory = model.get_normalized_expression(return_numpy=True, seed=3, **at_once)
    np.testing.assert_array_equal(written.compute(), in_memory)
    np.testing.assert_allclose(in_memory.sum(1), 1.0, rtol=1e-4)  # px_scale: fractions over genes

    parameters = model.get_likelihood_parameters(write_to="scvi", seed=4, batch_size=128, overwrite=True)
    direct = model.get_likelihood_parameters(seed=4, **at_once)
    for name in ("mean", "dispersions", "dropout"):
        np.testing.assert_array_equal(parameters[name].compute(), direct[name])
    observed_library = dense_counts(atlas).sum(1)
    np.testing.assert_allclose(direct["mean"].sum(1), observed_library, rtol=1e-4)
    np.testing.assert_allclose(direct["dispersions"][5], torch.exp(model.module.px_r).detach().numpy(), rtol=1e-6)

    sampled = model.posterior_predictive_sample(write_to="scvi_samples", seed=5, batch_size=128, overwrite=True)
    in_memory = model.posterior_predictive_sample(seed=5, **at_once)  # scvi-tools' sparse.GCXS (cells, genes)
    np.testing.assert_array_equal(sampled.compute().toarray(), in_memory.todense())

    library = model.get_latent_library_size(
        give_mean=False, write_to="library", batch_size=128, overwrite=True, output_store=atlas.parent / "library.zarr"
    )
    np.testing.assert_allclose(library.compute()[:, 0], observed_library, rtol=1e-5)
    assert "library" in anndata.read_zarr(atlas.parent / "library.zarr").obsm
    with pytest.raises(RuntimeError, match="does not compute the posterior distribution"):
        model.get_latent_library_size()

    adata = anndata.read_zarr(atlas)
    assert {"X_scvi"} <= set(adata.obsm) and {"scvi_normalized", "scvi_samples", "scvi_mean"} <= set(adata.layers)
    assert sp.issparse(adata.layers["scvi_samples"]) and adata.layers["scvi_normalized"].dtype == np.float32


def test_dense_and_csr_stores_give_the_same_outputs(model, atlas, tmp_path):
    """Over a CSR store the encoder multiplies the non-zeros only; over a dense store, the whole matrix."""
    dense_store = write_store(anndata.read_zarr(atlas), tmp_path / "dense.zarr", sparse=False)
    assert not dense_store.is_sparse and model.store.is_sparse
    model.save(tmp_path / "model")
    on_dense = SCVI.load(tmp_path / "model", dense_store)
    np.testing.assert_allclose(
        on_dense.get_latent_representation(), model.get_latent_representation(), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        on_dense.get_normalized_expression(return_numpy=True, seed=2),
        model.get_normalized_expression(return_numpy=True, seed=2),
        rtol=1e-4,
        atol=1e-7,
    )


def test_in_process_units_share_the_torch_threads_within_the_memory_budget(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        monkeypatch.setattr(runner, "IN_FLIGHT_BYTES", 1000)
        for unit_bytes, n_units, torch_threads in ((100, 4, 1), (400, 2, 2), (10_000, 1, 4)):
            with runner._compute_threads("cpu", unit_bytes) as running:
                assert (running, torch.get_num_threads()) == (n_units, torch_threads)
            assert torch.get_num_threads() == 4
        with runner._compute_threads("cuda", 100) as running:  # an accelerator: one unit at a time
            assert running == 1 and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


def test_values_of_a_cell_do_not_depend_on_its_company(model):
    full = model.get_normalized_expression(return_numpy=True, n_samples=2, seed=9)
    cells = [1100, 7, 300]
    some = model.get_normalized_expression(
        indices=cells, gene_list=["gene_3", "gene_500"], n_samples=2, seed=9, batch_size=2
    )
    np.testing.assert_allclose(some.to_numpy(), full[cells][:, [3, 500]], rtol=1e-5)
    assert list(some.index) == [f"cell_{cell}" for cell in cells]
    both = model.get_normalized_expression(indices=cells, transform_batch=["batch_0", "batch_1"], return_numpy=True)
    each = [
        model.get_normalized_expression(indices=cells, transform_batch=b, return_numpy=True)
        for b in ("batch_0", "batch_1")
    ]
    np.testing.assert_allclose(both, (each[0] + each[1]) / 2, rtol=1e-5)  # averaged over batches, as scvi-tools
    draws = model.get_normalized_expression(indices=cells, n_samples=3, return_mean=False)
    assert draws.shape == (3, 3, N_GENES)
    all_samples = model.posterior_predictive_sample(seed=4).to_scipy_sparse()  # CSR parts stacked in place
    some_samples = model.posterior_predictive_sample(indices=cells, seed=4).to_scipy_sparse()
    assert some_samples.nnz > 0 and (some_samples != all_samples[cells]).nnz == 0
    with pytest.raises(ValueError, match="not a valid batch category"):
        model.get_normalized_expression(indices=cells, transform_batch="batch_9")
    with pytest.raises(ValueError, match="not in the model"):
        model.get_normalized_expression(indices=cells, gene_list=["no_such_gene"])
    with pytest.raises(OutputError, match="every gene"):  # counts of a gene subset have no layer to go to
        model.posterior_predictive_sample(gene_list=["gene_3"], write_to="partial")


# --- posterior predictive samples -------------------------------------------------------------------------------


def test_posterior_predictive_moments_match_the_fitted_zinb(model):
    """Each draw s of a cell is ZINB(mu_s, theta, pi_s) given its own z_s; get_likelihood_parameters with the same
    seed sees the same z_s. Pooled over draws, mean and variance must match the mixture's within sampling error."""
    cells, n_draws = np.arange(0, N_CELLS, 40), 300
    samples = model.posterior_predictive_sample(indices=cells, n_samples=n_draws, seed=21)
    counts = np.moveaxis(samples.todense(), -1, 0)  # GCXS (cells, genes, draws) -> (draws, cells, genes)
    parameters = model.get_likelihood_parameters(indices=cells, n_samples=n_draws, seed=21)
    mu, theta, pi = parameters["mean"], parameters["dispersions"], parameters["dropout"]
    mean = (1 - pi) * mu
    variance = (1 - pi) * mu * (1 + mu / theta + pi * mu)
    pooled_mean = mean.mean(0)  # per cell and gene, over draws: a mixture over z
    pooled_variance = (variance + mean**2).mean(0) - pooled_mean**2
    n = counts.shape[0]
    empirical_mean, empirical_variance = counts.mean(0), counts.var(0)
    fourth = ((counts - empirical_mean) ** 4).mean(0)
    expressed = pooled_mean > 0.05
    z_mean = (empirical_mean - pooled_mean) / np.sqrt(pooled_variance / n)
    z_variance = (empirical_variance - pooled_variance) / np.sqrt(np.maximum(fourth - empirical_variance**2, 1e-12) / n)
    assert np.abs(z_mean[expressed]).max() < 6
    assert np.mean(np.abs(z_mean[expressed]) < 2) > 0.9  # ~95% expected within 2 standard errors
    assert np.mean(np.abs(z_variance[expressed]) < 2.5) > 0.85


# --- differential expression -------------------------------------------------------------------------------------


def test_de_ranks_planted_markers_above_null_genes_with_the_right_sign(model, atlas):
    var = model.store.var_frame()
    truth = 2.0 ** anndata.read_zarr(atlas).uns["synthetic_atlas"]["true_log2_scale"]  # (types, genes)
    for mode, key in (("vanilla", "bayes_factor"), ("change", "proba_de")):
        result = model.differential_expression(groupby="cell_type", mode=mode, silent=True, n_samples_overall=2000)
        assert list(result["comparison"].unique()) == [f"type_{t} vs Rest" for t in range(3)]
        for cell_type in range(3):
            rows = result[result["group1"] == f"type_{cell_type}"]
            assert rows[key].is_monotonic_decreasing
            true_lfc = np.log2(truth[cell_type] / np.delete(truth, cell_type, axis=0).mean(0))
            null = pd.Index(var.index[np.abs(true_lfc) < 0.3])
            markers = var.index[var["marker_of"] == f"type_{cell_type}"]
            rank = pd.Series(np.arange(len(rows)), index=rows.index)
            above_null = (rank[markers].to_numpy()[:, None] < rank[null].to_numpy()[None, :]).mean()
            # vanilla Bayes factors saturate for many genes (ties), so their ranking is the coarser of the two
            assert above_null > (0.85 if mode == "vanilla" else 0.9), (mode, cell_type, above_null)
            assert np.median(rank[markers]) < 0.1 * N_GENES
            if mode == "change":
                assert (rows.loc[markers, "lfc_mean"] > 0).mean() >= 0.9


def test_de_change_mode_follows_delta_and_fdr(model):
    def run(**options):
        return model.differential_expression(
            groupby="cell_type",
            group1="type_0",
            group2="type_1",
            mode="change",
            silent=True,
            n_samples_overall=1000,
            seed=4,
            **options,
        )

    narrow, wide = run(delta=0.25), run(delta=1.0)
    wide = wide.loc[narrow.index]
    assert (wide["proba_de"] <= narrow["proba_de"] + 1e-12).all()  # same samples: a wider null can only lose mass
    assert (narrow["delta"] == 0.25).all() and (narrow["proba_de"] + narrow["proba_not_de"]).eq(1).all()
    two_sided = run(delta=0.25, test_mode="two").loc[narrow.index]
    assert (two_sided["proba_de"] >= narrow["proba_de"] - 1e-12).all()
    np.testing.assert_allclose(two_sided["lfc_mean"], narrow["lfc_mean"])
    # the FDR call: the top n genes, n the number of ranks where the running mean of 1 - proba_de is <= 0.05
    ranked = narrow["proba_de"].to_numpy()
    n_called = int(((np.cumsum(1 - ranked) / np.arange(1, len(ranked) + 1)) <= 0.05).sum())
    assert narrow["is_de_fdr_0.05"].to_numpy().tolist() == [True] * n_called + [False] * (len(ranked) - n_called)
    assert not run(delta=50.0)["is_de_fdr_0.05"].any()
    vanilla = model.differential_expression(groupby="cell_type", group1="type_0", silent=True, n_samples_overall=500)
    np.testing.assert_allclose(vanilla["proba_m1"] + vanilla["proba_m2"], 1.0)
    np.testing.assert_allclose(
        vanilla["bayes_factor"], np.log(vanilla["proba_m1"] + 1e-8) - np.log(vanilla["proba_m2"] + 1e-8)
    )


def test_de_raw_statistics_equal_a_direct_computation(model, atlas, tmp_path):
    counts = dense_counts(atlas)
    groups = anndata.read_zarr(atlas).obs["cell_type"].to_numpy()
    in_group, in_other = groups == "type_2", groups == "type_0"
    result = model.differential_expression(
        groupby="cell_type",
        group1="type_2",
        group2="type_0",
        silent=True,
        n_samples_overall=200,
        write_to="de_type_2",
        table_path=tmp_path / "de.csv",
    )
    result = result.loc[model.store.var_names]
    normalized = counts / counts.sum(1, keepdims=True) * 1e4
    for suffix, cells in (("1", in_group), ("2", in_other)):
        np.testing.assert_allclose(result[f"raw_mean{suffix}"], counts[cells].mean(0), rtol=1e-6)
        np.testing.assert_allclose(result[f"non_zeros_proportion{suffix}"], (counts[cells] > 0).mean(0), rtol=1e-6)
        np.testing.assert_allclose(result[f"raw_normalized_mean{suffix}"], normalized[cells].mean(0), rtol=1e-5)
    rest = model.differential_expression(idx1=in_group, silent=True, n_samples_overall=200)
    np.testing.assert_allclose(rest.loc[model.store.var_names, "raw_mean2"], counts[~in_group].mean(0), rtol=1e-6)
    assert "comparison" not in rest.columns  # as scvi-tools: no group columns for idx1/idx2
    stored = anndata.read_zarr(atlas).uns["de_type_2"]
    np.testing.assert_allclose(stored["raw_mean1"].to_numpy(), result.loc[stored.index, "raw_mean1"].to_numpy())
    assert [path.name for path in tmp_path.glob("de*")] == ["de.csv"]  # exactly the path given
    np.testing.assert_allclose(
        pd.read_csv(tmp_path / "de.csv", index_col=0).loc[result.index, "raw_mean1"], result["raw_mean1"], rtol=1e-6
    )
    with pytest.raises(OutputError, match="already exists"):  # refused before any work
        model.differential_expression(groupby="cell_type", silent=True, write_to="de_type_2")


def test_de_draw_file_gives_back_each_side_as_written_in_any_unit_order():
    """The pass's temporary file of posterior draws: written unit by unit in any order (each unit a scatter of
    numbers), read back by side (consecutive numbers, repeats allowed as importance picks have them)."""
    from scvi_scale.outputs.differential import _DrawFile

    rng = np.random.default_rng(0)
    numbers = np.concatenate([np.arange(0, 300), np.arange(1000, 1250), np.arange(5000, 5007)])
    draws = rng.standard_normal((len(numbers), 33)).astype(np.float32)
    with _DrawFile(rng.permutation(np.repeat(numbers, 2)), 33) as spilled:
        for unit in np.array_split(rng.permutation(len(numbers)), 9):
            spilled.put(numbers[unit], draws[unit])
        for side in (slice(0, 300), slice(300, 550), slice(550, 557)):
            picks = rng.choice(np.arange(len(numbers))[side], size=400)
            np.testing.assert_array_equal(spilled.get(numbers[picks]), draws[picks])
    assert spilled.file.closed


def test_de_result_does_not_depend_on_passes_or_workers(model):
    options = dict(groupby="cell_type", mode="change", silent=True, n_samples_overall=300, seed=2)
    one_pass = model.differential_expression(**options)
    pass_per_comparison = model.differential_expression(**options, max_sample_bytes=1)
    pd.testing.assert_frame_equal(one_pass, pass_per_comparison)
    distributed = pytest.importorskip("distributed")
    threads = torch.get_num_threads()
    try:
        with (
            distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            on_workers = model.differential_expression(**options, client=client)
            written = model.get_normalized_expression(write_to="on_workers", client=client, seed=3, overwrite=True)
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(one_pass, on_workers)
    np.testing.assert_array_equal(written.compute(), model.get_normalized_expression(return_numpy=True, seed=3))


# --- crashes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_write_killed_half_way_resumes_to_the_uninterrupted_result(model, atlas, monkeypatch, kind):
    x_before = store_files(atlas, "X")
    key = f"crash_{kind}"
    write = (
        (lambda **o: model.get_normalized_expression(write_to=key, seed=8, **o))
        if kind == "dense"
        else (lambda **o: model.posterior_predictive_sample(write_to=key, seed=8, **o))
    )
    real_write, written = runner._write, []

    def crash_after_two(outputs, unit, result):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        real_write(outputs, unit, result)
        written.append(unit.index)

    monkeypatch.setattr(runner, "_write", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        write()
    with pytest.raises(OutputIncompleteError, match="2 of 5 chunks"):
        read_output(atlas, f"layers/{key}")
    anndata.read_zarr(atlas)  # still opens
    with pytest.raises(OutputError, match="other settings"):
        model.get_normalized_expression(write_to=key, seed=9) if kind == "dense" else model.posterior_predictive_sample(
            write_to=key, seed=9
        )

    monkeypatch.setattr(runner, "_write", real_write)
    computed = []
    real_compute = runner._compute
    monkeypatch.setattr(runner, "_compute", lambda *a, **k: computed.append(a[2].index) or real_compute(*a, **k))
    resumed = write().compute()
    assert sorted(computed) == [chunk for chunk in range(5) if chunk not in written]  # finished chunks are skipped
    if kind == "dense":
        np.testing.assert_array_equal(resumed, model.get_normalized_expression(return_numpy=True, seed=8))
    else:
        np.testing.assert_array_equal(resumed.toarray(), model.posterior_predictive_sample(seed=8).todense())
    assert store_files(atlas, "X") == x_before


FILE_SYSTEM_CHANGES = ("replace", "rename", "unlink", "remove", "rmdir", "mkdir")


class Killed(BaseException):
    """A simulated SIGKILL. Not an Exception, so `except Exception` cleanups do not run; and once raised, every later
    change to the file system raises it too (`finally` blocks included), as a killed process changes nothing more."""


@contextlib.contextmanager
def killed_before_change(monkeypatch, number: int):
    """Raise Killed instead of the number-th change to the file system (os.replace, rename, unlink, remove, rmdir,
    mkdir: every publishing rename, every deletion) and of every change after it. Yields [changes made]."""
    made = [0]
    with monkeypatch.context() as patched:
        for name in FILE_SYSTEM_CHANGES:

            def change(*args, _real=getattr(os, name), **kwargs):  # noqa: B008 - binds this name's function
                if made[0] + 1 >= number:
                    raise Killed(f"killed before file-system change {number}")
                made[0] += 1
                return _real(*args, **kwargs)

            patched.setattr(os, name, change)
        yield made


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_a_kill_before_any_file_system_change_leaves_nothing_or_the_whole_output(tmp_path, monkeypatch, kind):
    """Every change that prepare, write_chunk and finish make, in turn: a kill just before it leaves a store whose
    anndata view (through the consolidated metadata, as anndata reads it) holds no such entry or the whole of it,
    and a rerun (refused as "already exists" when the kill came after the output was in place) leaves the whole
    output, listed, and no progress folder."""
    rng = np.random.default_rng(0)
    pristine = tmp_path / "pristine.zarr"  # a store with few files: it is copied for every kill
    write_store(
        anndata.AnnData(sp.csr_matrix(rng.poisson(1.0, (200, 20)).astype(np.float32))), pristine, chunk_rows=128
    )
    dense = rng.random((200, 20)).astype(np.float32)
    values = dense if kind == "dense" else sp.csr_matrix(np.where(dense > 0.8, dense, 0))
    output_class = DenseOutput if kind == "dense" else CsrOutput

    def write(store: Path) -> None:
        output = output_class(str(store), "layers", "killed", 200, 20, 128, {"test": kind})
        for chunk in output.prepare():
            output.write_chunk(chunk, values[slice(*output.bounds(chunk))])
        output.finish()

    def as_dense(layer) -> np.ndarray:
        return layer.toarray() if sp.issparse(layer) else np.asarray(layer)

    number = 0
    while True:
        number += 1
        store = tmp_path / f"before{number}" / "s.zarr"
        shutil.copytree(pristine, store)
        with killed_before_change(monkeypatch, number) as made:
            try:
                write(store)
            except Killed:
                pass
            else:
                break
        layers = anndata.read_zarr(store).layers
        assert "killed" not in layers or np.array_equal(as_dense(layers["killed"]), as_dense(values)), number
        try:
            write(store)
        except OutputError as error:
            assert "already exists" in str(error), f"killed before change {number}: {error}"
        layer = anndata.read_zarr(store).layers.get("killed")
        assert layer is not None, f"killed before change {number}: the rerun's output is not listed"
        assert sp.issparse(layer) == (kind == "csr") and np.array_equal(as_dense(layer), as_dense(values)), number
        assert not progress_folder(store, "").exists(), f"killed before change {number}: progress left behind"
    assert number > 10 and made[0] == number - 1  # the uninterrupted write made every change the kills came before
    assert np.array_equal(as_dense(read_output(store, "layers/killed").compute()), as_dense(values))


# --- command line --------------------------------------------------------------------------------------------------


def test_command_line_writes_outputs(model, atlas, tmp_path, capsys):
    import argparse

    from scvi_scale.cli.outputs import add_commands

    model.save(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    output = tmp_path / "cli_outputs.zarr"
    for command in (
        ["latent", str(atlas), "--model", str(tmp_path / "model"), "--output-store", str(output)],
        ["normalize", str(atlas), "--model", str(tmp_path / "model"), "--output-store", str(output)],
        [
            "de",
            str(atlas),
            "--model",
            str(tmp_path / "model"),
            "--groupby",
            "cell_type",
            "--output-store",
            str(output),
            "--n-samples-overall",
            "200",
        ],
        ["sample", str(atlas), "--model", str(tmp_path / "model"), "--output-store", str(output)],
    ):
        args = parser.parse_args(command)
        assert args.run(args) == 0
        assert json.loads(capsys.readouterr().out)["written"]
    adata = anndata.read_zarr(output)
    assert {"X_scvi"} <= set(adata.obsm) and {"scvi_normalized", "scvi_samples"} <= set(adata.layers)
    assert "de_cell_type" in adata.uns


def test_normalized_expression_of_a_gene_subset_in_float16_is_written_to_obsm(model, atlas):
    """An atlas-sized layer may not fit the disk: a gene subset goes to obsm/<key> (its genes recorded), in float16
    if asked (half the bytes), equal to the in-memory values rounded to float16."""
    genes = list(model.var_names[::7])
    written = model.get_normalized_expression(
        gene_list=genes, write_to="norm_subset", dtype="float16", seed=4, overwrite=True
    )
    in_memory = model.get_normalized_expression(gene_list=genes, return_numpy=True, seed=4)
    values = np.asarray(written)
    assert values.dtype == np.float16 and values.shape == (model.store.n_obs, len(genes))
    np.testing.assert_array_equal(values, in_memory.astype(np.float16))
    adata = anndata.read_zarr(atlas)
    assert adata.obsm["norm_subset"].shape == (adata.n_obs, len(genes))
    import zarr

    record = zarr.open_group(str(atlas), mode="r")["obsm/norm_subset"].attrs["scvi_scale_output"]
    assert record["settings"]["genes"] == genes and record["dtype"] == "float16"
