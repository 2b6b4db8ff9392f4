"""Count stores: converters round-trip exactly through anndata.read_zarr, CountStore reads what was written, bad
input fails early with errors that name what is wrong and where (rows, cells, values)."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import zarr

from scvi_scale.data import (
    CountStore,
    CountValidationError,
    StoreError,
    StoreWriter,
    validate_counts,
    write_store,
)
from scvi_scale.data import store as store_module
from scvi_scale.data import writer as store_writer
from scvi_scale.data.store import CHUNK_ROWS_ATTR

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CELLBENCH = SHARED_DATA / "cellbench_3cl.h5ad"

pytestmark = pytest.mark.filterwarnings("ignore:.*zarr v2 data will no longer be the default.*")


def make_adata(n_obs=300, n_vars=40, seed=0, density=0.3) -> ad.AnnData:
    """Small count AnnData: NB-like integer counts (float32 CSR), categorical/numeric/string obs, a var column."""
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(2, 0.4, size=(n_obs, n_vars)) * (rng.random((n_obs, n_vars)) < density)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(rng.choice(["b2", "b0", "b1"], n_obs), categories=["b2", "b0", "b1", "unused"]),
            "score": rng.normal(size=n_obs),
            "donor": rng.choice(["d1", "d2"], n_obs).astype(object),
            "n_genes": rng.integers(0, 100, n_obs),
        },
        index=[f"cell_{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame({"symbol": [f"SYM{i}" for i in range(n_vars)]}, index=[f"gene_{i}" for i in range(n_vars)])
    return ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), obs=obs, var=var)


def assert_same_anndata(read_back: ad.AnnData, expected: ad.AnnData) -> None:
    """X equal value for value (as float32), obs and var equal including dtypes and categories."""
    got = read_back.X.toarray() if sp.issparse(read_back.X) else read_back.X
    want = expected.X.toarray() if sp.issparse(expected.X) else np.asarray(expected.X)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32))
    pd.testing.assert_frame_equal(read_back.obs, expected.obs)
    pd.testing.assert_frame_equal(read_back.var, expected.var)


@pytest.fixture
def cellbench_h5ad(tmp_path) -> Path:
    if not CELLBENCH.exists():
        pytest.skip(f"real data not found at {CELLBENCH}")
    copy = tmp_path / "cellbench.h5ad"
    shutil.copy(CELLBENCH, copy)
    return copy


def write_10x_folder(folder: Path, adata: ad.AnnData, compressed: bool, cell_major: bool) -> None:
    """A 10x folder: matrix.mtx genes x cells (entries cell by cell as 10x writes them, or gene by gene)."""
    folder.mkdir()
    genes_by_cells = sp.csr_matrix(adata.X).T
    matrix = sp.coo_matrix(genes_by_cells.tocsc() if cell_major else genes_by_cells.tocsr())
    scipy.io.mmwrite(folder / "matrix.mtx", matrix, field="integer")
    barcodes = pd.DataFrame({0: adata.obs_names})
    if compressed:
        with open(folder / "matrix.mtx", "rb") as plain, gzip.open(folder / "matrix.mtx.gz", "wb") as packed:
            shutil.copyfileobj(plain, packed)
        (folder / "matrix.mtx").unlink()
        features = pd.DataFrame({0: adata.var_names, 1: adata.var["symbol"], 2: "Gene Expression"})
        features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
        barcodes.to_csv(folder / "barcodes.tsv.gz", sep="\t", header=False, index=False)
    else:
        pd.DataFrame({0: adata.var_names, 1: adata.var["symbol"]}).to_csv(
            folder / "genes.tsv", sep="\t", header=False, index=False
        )
        barcodes.to_csv(folder / "barcodes.tsv", sep="\t", header=False, index=False)


# --- round trips ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_anndata_round_trip_is_exact(tmp_path, sparse, zarr_format):
    adata = make_adata()
    if not sparse:
        adata.X = adata.X.toarray()
    store = write_store(adata, tmp_path / "s.zarr", chunk_rows=64, zarr_format=zarr_format)
    assert store.is_sparse == sparse and store.shape == adata.shape and store.chunk_rows == 64
    assert_same_anndata(ad.read_zarr(tmp_path / "s.zarr"), adata)
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r").metadata.zarr_format == zarr_format


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_csr_indptr_is_int32_below_2_to_the_31_non_zeros_and_int64_beyond(tmp_path, monkeypatch, zarr_format):
    """scipy selects rows of int32 indices with an int64 indptr by copying all the indices first: in-memory readers
    of the store (scanpy, scvi-tools) must get matching int32 index arrays, as anndata writes them."""
    adata = make_adata(n_obs=3000, n_vars=400)
    write_store(adata, tmp_path / "narrow.zarr", chunk_rows=1000, zarr_format=zarr_format)
    monkeypatch.setattr(store_writer, "INT32_INDEX_LIMIT", adata.X.nnz - 1)  # as if there were 2^31 non-zeros
    write_store(adata, tmp_path / "wide.zarr", chunk_rows=1000, zarr_format=zarr_format)
    for name, dtype in (("narrow", np.int32), ("wide", np.int64)):
        x = ad.read_zarr(tmp_path / f"{name}.zarr").X
        assert x.indptr.dtype == dtype and x.indices.dtype == np.int32
        assert (x != adata.X).nnz == 0
        np.testing.assert_array_equal(
            CountStore(tmp_path / f"{name}.zarr").read_csr(900, 2100).toarray(), adata.X[900:2100].toarray()
        )


def test_csr_layout_has_row_aligned_chunks(tmp_path):
    store = write_store(make_adata(n_obs=3000, n_vars=400), tmp_path / "s.zarr", chunk_rows=1000)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["X"]
    assert group["data"].dtype == np.float32
    assert group.attrs[CHUNK_ROWS_ATTR] == 1000 == store.chunk_rows
    # data and indices chunks hold a quarter of the first row block's non-zeros (above the 16,384 floor here)
    nnz_first_block = int(group["indptr"][1000])
    assert nnz_first_block // 4 > 16_384
    assert group["data"].chunks == group["indices"].chunks == (-(-nnz_first_block // 4),)


def test_h5ad_round_trip_real_data(cellbench_h5ad, tmp_path):
    expected = ad.read_h5ad(cellbench_h5ad)
    store = write_store(cellbench_h5ad, tmp_path / "cb.zarr", chunk_rows=128)
    assert store.n_obs == 499 and store.is_sparse
    read_back = ad.read_zarr(tmp_path / "cb.zarr")
    assert_same_anndata(read_back, expected)
    assert list(read_back.obs["batch"].cat.categories) == list(expected.obs["batch"].cat.categories)


def test_h5ad_layer_goes_to_x(tmp_path):
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.multiply(0.5).tocsr()  # not counts: must not be what is written
    adata.write_h5ad(tmp_path / "in.h5ad")
    write_store(tmp_path / "in.h5ad", tmp_path / "s.zarr", chunk_rows=50, layer="counts")
    expected = adata.copy()
    expected.X = adata.layers["counts"]
    assert_same_anndata(ad.read_zarr(tmp_path / "s.zarr"), expected)


@pytest.mark.parametrize("nullable", [False, True], ids=["by-blocks", "nullable-read-whole"])
def test_h5ad_obs_of_every_kind_round_trips(tmp_path, monkeypatch, nullable):
    """obs columns as anndata.io.write_elem leaves them (strings not turned into categoricals), index named."""
    adata = make_adata(n_obs=200)
    adata.obs.index.name = "barcode"
    adata.obs["flag"] = np.arange(200) % 3 == 0
    adata.obs["stage"] = pd.Categorical(np.repeat(["early", "late"], 100), categories=["early", "late"], ordered=True)
    if nullable:
        adata.obs["n_umi"] = pd.array(np.arange(200), dtype="Int64")
    with h5py.File(tmp_path / "in.h5ad", "w") as file:
        file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        for key, value in (("X", adata.X), ("obs", adata.obs), ("var", adata.var)):
            ad.io.write_elem(file, key, value)
    whole_obs_reads = []
    read_elem = ad.io.read_elem
    monkeypatch.setattr(ad.io, "read_elem", lambda elem: whole_obs_reads.append(elem.name) or read_elem(elem))
    write_store(tmp_path / "in.h5ad", tmp_path / "s.zarr", chunk_rows=64)
    monkeypatch.undo()
    assert ("/obs" in whole_obs_reads) == nullable  # without nullable columns obs is only read by row blocks
    read_back = ad.read_zarr(tmp_path / "s.zarr")
    assert read_back.obs["donor"].dtype == object and read_back.obs.index.name == "barcode"
    assert_same_anndata(read_back, adata)


@pytest.mark.parametrize(("compressed", "cell_major"), [(True, True), (False, False)], ids=["10x-v3", "genes-tsv"])
def test_10x_folder_round_trip(tmp_path, compressed, cell_major):
    adata = make_adata(n_obs=250, n_vars=30)
    write_10x_folder(tmp_path / "tenx", adata, compressed, cell_major)
    write_store(tmp_path / "tenx", tmp_path / "s.zarr", chunk_rows=64)
    read_back = ad.read_zarr(tmp_path / "s.zarr")
    np.testing.assert_array_equal(read_back.X.toarray(), adata.X.toarray())
    assert list(read_back.obs_names) == list(adata.obs_names)
    assert list(read_back.var_names) == list(adata.var_names)
    assert list(read_back.var["gene_symbols"]) == list(adata.var["symbol"])
    assert ("feature_types" in read_back.var) == compressed


def test_10x_header_mismatch_is_reported(tmp_path):
    adata = make_adata(n_obs=20, n_vars=10)
    write_10x_folder(tmp_path / "tenx", adata, compressed=False, cell_major=True)
    one_short = pd.DataFrame({0: adata.obs_names[:-1]})
    one_short.to_csv(tmp_path / "tenx" / "barcodes.tsv", sep="\t", header=False, index=False)
    with pytest.raises(StoreError, match=r"10 genes x 20 cells .* 19 cells"):
        write_store(tmp_path / "tenx", tmp_path / "s.zarr")


@pytest.mark.parametrize("kind", ["csc", "dense"])
def test_matrix_with_frames_round_trip(tmp_path, kind):
    adata = make_adata()
    matrix = adata.X.tocsc() if kind == "csc" else adata.X.toarray().astype(np.int64)
    write_store(matrix, tmp_path / "s.zarr", obs=adata.obs, var=adata.var, chunk_rows=70)
    read_back = ad.read_zarr(tmp_path / "s.zarr")
    if kind == "dense":
        read_back.X = sp.csr_matrix(read_back.X)
    assert_same_anndata(read_back, adata)


@pytest.mark.filterwarnings("ignore:.*autosharding.*", "ignore:Consolidated metadata.*")
def test_zarr_store_rechunks_and_foreign_stores_open(tmp_path):
    adata = make_adata(n_obs=500)
    ad.settings.zarr_write_format = 3
    try:
        adata.write_zarr(tmp_path / "foreign.zarr")  # written by anndata itself: no chunk_rows attribute
    finally:
        ad.settings.zarr_write_format = 2
    foreign = CountStore(tmp_path / "foreign.zarr")
    assert foreign.is_sparse and 1 <= foreign.chunk_rows <= 500
    rechunked = write_store(tmp_path / "foreign.zarr", tmp_path / "re.zarr", chunk_rows=33)
    assert rechunked.chunk_rows == 33
    assert_same_anndata(ad.read_zarr(tmp_path / "re.zarr"), adata)


# --- reading ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_count_store_blocks_dask_and_pickle(tmp_path, sparse):
    adata = make_adata(n_obs=230)
    dense = adata.X.toarray()
    store = write_store(adata, tmp_path / "s.zarr", chunk_rows=50, sparse=sparse)
    np.testing.assert_array_equal(store.block_bounds(), [0, 50, 100, 150, 200, 230])
    np.testing.assert_array_equal(store.block_bounds(100), [0, 100, 200, 230])
    for start, stop in [(0, 50), (37, 141), (229, 230), (10, 10)]:
        block = store.read_csr(start, stop)
        assert sp.isspmatrix_csr(block) and block.dtype == np.float32 and block.shape == (stop - start, 40)
        np.testing.assert_array_equal(block.toarray(), dense[start:stop])
        rows = store.read_dense(start, stop)
        assert rows.dtype == np.float32
        np.testing.assert_array_equal(rows, dense[start:stop])
    lazy = store.to_dask()
    assert lazy.shape == (230, 40) and lazy.chunks == ((50, 50, 50, 50, 30), (40,))
    computed = lazy.compute()
    np.testing.assert_array_equal(computed.toarray() if sparse else computed, dense)
    assert sp.issparse(lazy.blocks[1].compute()) == sparse
    reopened = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(reopened.read_dense(0, 230), dense)
    assert store.obs_keys() == ["batch", "score", "donor", "n_genes"]
    batch = store.obs_column("batch")
    assert isinstance(batch.dtype, pd.CategoricalDtype) and list(batch.cat.categories) == ["b2", "b0", "b1", "unused"]
    pd.testing.assert_index_equal(batch.index, pd.RangeIndex(adata.n_obs))  # by position: names read on demand
    pd.testing.assert_index_equal(store.obs_names, adata.obs_names)
    pd.testing.assert_index_equal(store.var_names, adata.var_names)
    with pytest.raises(IndexError, match=r"\[200, 231\)"):
        store.read_csr(200, 231)


def test_read_csr_from_threads_matches_serial(tmp_path):
    adata = make_adata(n_obs=2000, n_vars=50)
    store = write_store(adata, tmp_path / "s.zarr", chunk_rows=100)
    starts = np.random.default_rng(1).integers(0, 1900, 64)
    with ThreadPoolExecutor(max_workers=8) as pool:
        blocks = list(pool.map(lambda start: store.read_csr(start, start + 100), starts))
    for start, block in zip(starts, blocks):
        np.testing.assert_array_equal(block.toarray(), adata.X[start : start + 100].toarray())


@pytest.mark.parametrize("compressor", ["lz4hc", "zstd"], ids=["today", "zstd-as-written-before"])
def test_our_stores_are_read_from_their_chunk_files_exactly_without_zarr(tmp_path, monkeypatch, compressor):
    monkeypatch.setattr(store_writer, "COMPRESSOR_NAME", compressor)
    monkeypatch.setattr(store_writer, "MIN_NNZ_CHUNK", 100)
    adata = make_adata(n_obs=700, n_vars=50)
    store = write_store(adata, tmp_path / "s.zarr", chunk_rows=64)  # data chunks of ~240 values: a quarter block
    data = zarr.open_array(str(tmp_path / "s.zarr" / "X" / "data"))
    assert data.metadata.codecs[1].cname.value == compressor and data.nchunks > 30
    assert set(store._chunk_files) == {"X/data", "X/indices", "X/indptr"}
    rng = np.random.default_rng(3)
    bounds = [(0, 700), (699, 700), (5, 5), *zip(*np.sort(rng.integers(0, 701, (2, 40)), axis=0))]
    monkeypatch.setattr(zarr.Array, "__getitem__", lambda *args: pytest.fail("read through zarr"))
    for start, stop in bounds:
        np.testing.assert_array_equal(store.read_csr(int(start), int(stop)).toarray(), adata.X[start:stop].toarray())


@pytest.mark.filterwarnings("ignore:.*autosharding.*", "ignore:Consolidated metadata.*")
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_stores_written_by_others_are_read_through_zarr_exactly(tmp_path, zarr_format):
    adata = make_adata(n_obs=400, n_vars=30)
    ad.settings.zarr_write_format = zarr_format
    try:
        adata.write_zarr(tmp_path / "foreign.zarr")  # anndata's own codecs (zstd, no checksums)
    finally:
        ad.settings.zarr_write_format = 2
    store = CountStore(tmp_path / "foreign.zarr")
    assert store._chunk_files == {}
    np.testing.assert_array_equal(store.read_csr(13, 377).toarray(), adata.X[13:377].toarray())


def test_indptr_chunks_kept_in_memory_stay_within_their_cap_and_reads_stay_exact(tmp_path, monkeypatch):
    adata = make_adata(n_obs=2000, n_vars=50)
    store = write_store(adata, tmp_path / "s.zarr", chunk_rows=50)  # indptr chunks of 800 entries: 3 of them
    entries_per_chunk = store._indptr.chunks[0]
    assert -(-(store.n_obs + 1) // entries_per_chunk) == 3
    monkeypatch.setattr(store_module, "INDPTR_CACHE_BYTES", 2 * entries_per_chunk * 8)  # room for two
    rng = np.random.default_rng(2)
    starts = rng.integers(0, 1990, 200)
    stops = np.minimum(starts + rng.integers(1, 900, 200), store.n_obs)  # some blocks span all three chunks
    with ThreadPoolExecutor(max_workers=4) as pool:
        blocks = list(pool.map(lambda bounds: store.read_csr(*map(int, bounds)), zip(starts, stops)))
    for start, stop, block in zip(starts, stops, blocks):
        np.testing.assert_array_equal(block.toarray(), adata.X[start:stop].toarray())
    assert 1 <= len(store._indptr_chunks) <= 2  # the least recently used dropped


# --- crash safety -----------------------------------------------------------------------------------------------


def test_interrupted_write_leaves_nothing(tmp_path):
    adata = make_adata()
    with pytest.raises(RuntimeError, match="power cut"):
        with StoreWriter(tmp_path / "s.zarr", adata.var, chunk_rows=50) as writer:
            writer.append(adata.X[:120], adata.obs.iloc[:120])
            raise RuntimeError("power cut")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_when_complete(tmp_path):
    first = make_adata(seed=0)
    write_store(first, tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="already exists"):
        write_store(make_adata(seed=1), tmp_path / "s.zarr")
    bad = make_adata(seed=1)
    bad_counts = bad.X.toarray()
    bad_counts[5, 3] = -1
    bad.X = sp.csr_matrix(bad_counts)
    with pytest.raises(CountValidationError):
        write_store(bad, tmp_path / "s.zarr", overwrite=True)
    assert_same_anndata(ad.read_zarr(tmp_path / "s.zarr"), first)  # the old store survived the failed rewrite
    second = make_adata(seed=2)
    write_store(second, tmp_path / "s.zarr", overwrite=True)
    assert_same_anndata(ad.read_zarr(tmp_path / "s.zarr"), second)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.zarr"]


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [(-2.0, "non-negative"), (np.nan, "finite"), (np.inf, "finite"), (1.5, "integer-valued")],
)
@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_bad_counts_are_named_while_converting(tmp_path, value, problem, sparse):
    adata = make_adata(n_obs=300)
    dense = adata.X.toarray()
    dense[137, 7] = value
    dense[250, 1] = value  # a later offender: the error names the first
    matrix = sp.csr_matrix(dense) if sparse else dense
    with pytest.raises(CountValidationError) as raised:
        write_store(matrix, tmp_path / "s.zarr", obs=adata.obs, var=adata.var, chunk_rows=100)
    message = str(raised.value)
    assert f"must be {problem}" in message
    assert "row 137 (cell 'cell_137')" in message and "gene 'gene_7'" in message
    assert "[100, 200)" in message and repr(float(value)) in message
    assert not (tmp_path / "s.zarr").exists()
    write_store(matrix, tmp_path / "unchecked.zarr", obs=adata.obs, var=adata.var, chunk_rows=100, validate=False)
    with pytest.raises(CountValidationError, match=r"row 137 \(cell 'cell_137'\).*\[120, 160\)"):
        validate_counts(tmp_path / "unchecked.zarr", block_rows=40)


def test_convert_of_log_normalized_x_points_to_the_counts_layer(tmp_path, capsys):
    """The common .h5ad after scanpy's normalize_total + log1p: X log-normalized, the raw counts in
    layers["counts"]. X is refused (it is not counts) and the message says where the counts are."""
    from scvi_scale.cli import main

    adata = make_adata(n_obs=50)
    counts = adata.X.copy()
    adata.layers["counts"] = counts
    adata.X = sp.csr_matrix(np.log1p(counts.toarray() / counts.sum(1).A * 1e4))
    adata.write_h5ad(tmp_path / "normalized.h5ad")
    assert main(["convert", str(tmp_path / "normalized.h5ad"), str(tmp_path / "x.zarr")]) != 0
    message = capsys.readouterr().err
    assert "must be integer-valued" in message
    assert "normalized.h5ad has a 'counts' layer: `--layer counts`" in message and "takes the counts" in message
    assert not (tmp_path / "x.zarr").exists()
    assert main(["convert", str(tmp_path / "normalized.h5ad"), str(tmp_path / "counts.zarr"), "--layer", "counts"]) == 0
    np.testing.assert_array_equal(CountStore(tmp_path / "counts.zarr").read_dense(0, 50), counts.toarray())
    with pytest.raises(CountValidationError, match="the AnnData has a 'counts' layer"):
        write_store(adata, tmp_path / "in_memory.zarr")


def test_valid_counts_pass_validation(cellbench_h5ad, tmp_path):
    store = write_store(cellbench_h5ad, tmp_path / "cb.zarr", chunk_rows=100, validate=False)
    validate_counts(store)
    validate_counts(store, block_rows=7)


def test_missing_layer_and_obs_column(tmp_path):
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.write_zarr(tmp_path / "a.zarr")
    with pytest.raises(StoreError, match=r"no layer 'raw_counts'.*\['counts'\]"):
        CountStore(tmp_path / "a.zarr", layer="raw_counts")
    with pytest.raises(StoreError, match=r"no layer 'raw_counts'.*\['counts'\]"):
        write_store(adata, tmp_path / "b.zarr", layer="raw_counts")
    store = CountStore(tmp_path / "a.zarr", layer="counts")
    with pytest.raises(StoreError, match=r"no column 'cell_type'.*'batch', 'score'"):
        store.obs_column("cell_type")


def test_obs_length_mismatch(tmp_path):
    adata = make_adata()
    with pytest.raises(StoreError, match="obs has 299 rows but the counts have 300"):
        write_store(adata.X, tmp_path / "s.zarr", obs=adata.obs.iloc[:-1], var=adata.var)
    adata.write_zarr(tmp_path / "a.zarr")
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="r+", use_consolidated=False)
    ad.io.write_elem(group, "obs", adata.obs.iloc[:250])
    zarr.consolidate_metadata(str(tmp_path / "a.zarr"))
    with pytest.raises(StoreError, match="obs has 250 rows but the counts have 300 rows"):
        CountStore(tmp_path / "a.zarr")


def test_duplicated_var_names(tmp_path):
    adata = make_adata()
    adata.var_names = ["gene_0", "gene_1"] * 20
    with pytest.raises(StoreError, match="38 duplicated var names"):
        write_store(adata, tmp_path / "s.zarr")
    with pytest.warns(UserWarning):
        adata.write_zarr(tmp_path / "a.zarr")  # anndata warns about non-unique names but writes them
    with pytest.raises(StoreError, match=r"duplicated var names, e.g. \['gene_0', 'gene_1'"):
        CountStore(tmp_path / "a.zarr")


def test_empty_inputs(tmp_path):
    with pytest.raises(StoreError, match="no rows were written; an empty store"):
        write_store(np.zeros((0, 5)), tmp_path / "s.zarr")
    assert list(tmp_path.iterdir()) == []
    ad.AnnData(sp.csr_matrix((0, 5), dtype=np.float32)).write_zarr(tmp_path / "a.zarr")
    with pytest.raises(StoreError, match=r"empty: shape \(0, 5\)"):
        CountStore(tmp_path / "a.zarr")


def test_not_an_anndata_store(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(StoreError, match="not a Zarr group"):
        CountStore(tmp_path / "folder")
    with pytest.raises(StoreError, match="does not exist"):
        write_store(tmp_path / "missing.h5ad", tmp_path / "s.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("x", shape=(3,), dtype="f4")
    with pytest.raises(StoreError, match="not an AnnData store"):
        CountStore(tmp_path / "plain.zarr")
    with pytest.raises(StoreError, match=r"not an \.h5ad file, a 10x folder"):
        write_store(tmp_path / "folder", tmp_path / "s.zarr")


def test_counts_beyond_float32_are_refused_not_stored_as_inf(tmp_path):
    adata = make_adata(n_obs=300)
    dense = adata.X.toarray().astype(np.float64)
    dense[212, 5] = 1e39  # a finite float64 integer, inf in float32
    with pytest.raises(
        CountValidationError,
        match=r"at most 3.4028235e\+38 .* row 212 \(cell 'cell_212'\) has "
        r"value 1e\+39 at gene 'gene_5'",
    ):
        write_store(sp.csr_matrix(dense), tmp_path / "s.zarr", obs=adata.obs, var=adata.var, chunk_rows=100)
    assert list(tmp_path.iterdir()) == []


def test_missing_strings_in_obs_are_refused_naming_the_rows(tmp_path):
    adata = make_adata(n_obs=300)
    donor = adata.obs["donor"].to_numpy().copy()
    donor[[120, 260]] = [np.nan, None]
    adata.obs["donor"] = donor
    with pytest.raises(
        StoreError,
        match=r"'donor' \(strings\) has missing values .* in 1 row\(s\) of rows "
        r"\[100, 200\), e.g. rows \[120\] \(cells \['cell_120'\]\)",
    ):
        write_store(adata, tmp_path / "s.zarr", chunk_rows=100)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_chunk_checksums_in_format_3_and_none_said_once_in_format_2(tmp_path, zarr_format, caplog):
    with caplog.at_level("INFO", logger="scvi_scale.data"):
        store = write_store(make_adata(), tmp_path / "s.zarr", chunk_rows=64, zarr_format=zarr_format)
        CountStore(tmp_path / "s.zarr")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    arrays = [group["X"][name] for name in ("data", "indices", "indptr")] + [
        group["obs/batch/codes"],
        group["obs/donor"],
        group["var/symbol"],
    ]
    with_crc = [
        any(type(codec).__name__ == "Crc32cCodec" for codec in array.metadata.codecs)
        for array in arrays
        if array.metadata.zarr_format == 3
    ]
    assert with_crc == ([True] * 6 if zarr_format == 3 else [])
    assert store.checksummed == (zarr_format == 3)
    assert caplog.text.count("carries no chunk checksums") == (0 if zarr_format == 3 else 1)


KILLED_WRITER = """
import sys, numpy as np, pandas as pd, scipy.sparse as sp
from scvi_scale.data import StoreWriter
var = pd.DataFrame(index=[f"g{i}" for i in range(50)])
with StoreWriter(sys.argv[1], var, chunk_rows=10) as writer:
    for block in range(10**9):  # until killed
        writer.append(sp.csr_matrix(np.ones((10, 50))), pd.DataFrame(index=[f"c{block}_{i}" for i in range(10)]))
        if block == 3:
            print("writing", flush=True)
"""


def test_a_killed_writer_leaves_no_store_and_the_next_writer_removes_its_leftovers(tmp_path):
    target = tmp_path / "s.zarr"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.kill()
    writer.wait()
    left = [path.name for path in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".s.zarr.partial-{socket.gethostname()}-{writer.pid}-")
    older_form = tmp_path / ".s.zarr.partial-0123456789ab"  # as writers before named themselves left them
    running = tmp_path / f".s.zarr.partial-{socket.gethostname()}-{os.getpid()}-fedcba987654"  # a live writer's
    unrelated = tmp_path / ".s.zarr.backup"
    for folder in (older_form, running, unrelated):
        folder.mkdir()
    write_store(make_adata(), target)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([running.name, unrelated.name, "s.zarr"])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_read_element_reads_obs_and_var_as_anndata_does(tmp_path, zarr_format):
    """store.read_element (training's reader of obs columns and names, without importing anndata) against
    anndata.io.read_elem on every obs column and index anndata writes: categorical (with a missing value, ordered,
    integer categories), numeric, boolean, strings, and a nullable integer (read by anndata itself)."""
    n = 6
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(["a", "b", None, "a", "c", "b"]),
            "stage": pd.Categorical(["lo", "hi", "hi", "lo", "lo", "hi"], categories=["lo", "hi"], ordered=True),
            "plate": pd.Categorical([3, 1, 3, 2, 1, 1]),
            "score": np.linspace(0, 1, n),
            "count": np.arange(n),
            "flag": np.arange(n) % 2 == 0,
            "donor": [f"donor {i}" for i in range(n)],
            "nullable": pd.array([1, None, 3, 4, None, 6], dtype="Int64"),
        },
        index=[f"cell_{i}" for i in range(n)],
    )
    adata = ad.AnnData(np.zeros((n, 3), dtype=np.float32), obs=obs)
    adata.var_names = ["g0", "g1", "g2"]
    path = tmp_path / "store.zarr"
    with ad.settings.override(zarr_write_format=zarr_format):
        adata.write_zarr(path)
    root = zarr.open_group(path, mode="r")
    for group, keys in (("obs", ["_index", *obs.columns]), ("var", ["_index"])):
        for key in keys:
            want = ad.io.read_elem(root[group][key])
            got = store_module.read_element(root[group][key])
            assert type(got) is type(want), (group, key)
            pd.testing.assert_series_equal(pd.Series(got), pd.Series(want), obj=f"{group}/{key}")
