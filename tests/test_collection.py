"""StoreCollection: three stores with different gene orders, a gene missing from one and a gene only in another
(one store dense) read the same counts, obs and var as `anndata.concat` of the same data, cell by cell, through
CountStore-like reads, the dask view and both samplers."""

from __future__ import annotations

import json
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_scale.data import CountStore, StoreError, write_store
from scvi_scale.data.collection import StoreCollection
from scvi_scale.data.registry import library_log_stats
from scvi_scale.sampler import BlockShuffleSampler, SequentialSampler

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*zarr v2 data will no longer be the default.*", "ignore:Observation names are not unique"
)

GENES = [f"g{index}" for index in range(25)]
# (cells, chunk_rows, genes in store order, sparse): sizes that are not multiples of the chunks, so reads straddle
# both chunk and store boundaries; store b lacks g5, store c alone has "extra".
STORES = {
    "a": (230, 64, list(np.random.default_rng(1).permutation(GENES)), True),
    "b": (101, 32, [gene for gene in reversed(GENES) if gene != "g5"], True),
    "c": (170, 50, list(np.random.default_rng(2).permutation(GENES + ["extra"])), False),
}


def _adata(name: str, seed: int) -> ad.AnnData:
    n_cells, _, genes, _ = STORES[name]
    rng = np.random.default_rng(seed)
    counts = sp.random(n_cells, len(genes), density=0.3, random_state=seed, format="csr", dtype=np.float32)
    counts.data = rng.integers(1, 50, counts.nnz).astype(np.float32)
    types = {"a": ["T2", "T10", "T1"], "b": ["T3", "T1"], "c": ["T1", "T2"]}[name]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(types, n_cells), categories=types),
            "batch": pd.Categorical([f"{name}_{i % 2}" for i in range(n_cells)]),
            "score": rng.normal(size=n_cells),
        },
        index=[f"{name}_cell{i}" for i in range(n_cells)],
    )
    if name == "b":
        obs["only_in_b"] = rng.integers(0, 3, n_cells)
    var = pd.DataFrame({"position": np.arange(len(genes)), "source": name}, index=genes)
    return ad.AnnData(counts, obs=obs, var=var)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("collection")
    paths = []
    for seed, (name, (_, chunk_rows, _, sparse)) in enumerate(STORES.items()):
        path = folder / f"{name}.zarr"
        write_store(_adata(name, seed), path, chunk_rows=chunk_rows, sparse=sparse)
        paths.append(path)
    return paths


def _concat(paths, **kwargs) -> ad.AnnData:
    """The reference: anndata.concat of the stores read back into memory (X as CSR throughout)."""
    adatas = [ad.read_zarr(path) for path in paths]
    for adata in adatas:
        adata.X = sp.csr_matrix(adata.X)
    return ad.concat(adatas, **kwargs)


@pytest.mark.parametrize("join", ["inner", "outer"])
def test_counts_match_anndata_concat_cell_by_cell(stores, join):
    collection = StoreCollection(stores, join=join)
    reference = _concat(stores, join=join)
    assert list(collection.var_names) == list(reference.var_names)
    assert ("g5" in collection.var_names) == (join == "outer") and ("extra" in collection.var_names) == (
        join == "outer"
    )
    assert collection.shape == reference.shape and collection.is_sparse
    expected = reference.X.toarray()
    np.testing.assert_array_equal(collection.read_dense(0, collection.n_obs), expected)
    # every cell on its own, and ranges that start and stop anywhere (across chunks and stores)
    for row in range(collection.n_obs):
        np.testing.assert_array_equal(collection.read_csr(row, row + 1).toarray()[0], expected[row])
    rng = np.random.default_rng(0)
    for start, stop in [(225, 240), (0, 331), (330, 332), (229, 501), (501, 501), (0, 0)] + [
        tuple(sorted(rng.integers(0, collection.n_obs + 1, 2))) for _ in range(30)
    ]:
        block = collection.read_csr(start, stop)
        assert (
            block.dtype == np.float32 and block.has_sorted_indices and block.shape == (stop - start, collection.n_vars)
        )
        np.testing.assert_array_equal(block.toarray(), expected[start:stop])
        np.testing.assert_array_equal(collection.read_dense(start, stop), expected[start:stop])
        raw = collection.read_raw(start, stop)
        assert sp.issparse(raw)
        np.testing.assert_array_equal(raw.toarray(), expected[start:stop])
    np.testing.assert_array_equal(collection.to_dask().compute().toarray(), expected)
    with pytest.raises(IndexError, match=r"\[0, 501\)"):
        collection.read_csr(500, 502)


@pytest.mark.parametrize("join", ["inner", "outer"])
def test_obs_and_var_match_anndata_concat(stores, join):
    collection = StoreCollection(stores, join=join, label="study", keys=["A", "B", "C"])
    reference = _concat(stores, join=join, label="study", keys=["A", "B", "C"], merge="first")
    assert collection.obs_keys() == list(reference.obs.columns)
    assert ("only_in_b" in collection.obs_keys()) == (join == "outer")
    assert collection.obs_names.equals(reference.obs_names)
    for key in reference.obs.columns:
        pd.testing.assert_series_equal(
            collection.obs_column(key), reference.obs[key].reset_index(drop=True)
        )  # by position
    assert list(collection.obs_column("cell_type").cat.categories) == ["T1", "T2", "T3", "T10"]  # natural order
    pd.testing.assert_frame_equal(collection.var_frame(), reference.var)
    with pytest.raises(StoreError, match="no column 'nope'"):
        collection.obs_column("nope")


def test_locate_and_store_index_point_back_into_each_store(stores):
    collection = StoreCollection(stores)
    reference = _concat(stores, label="store")
    np.testing.assert_array_equal(collection.store_index, reference.obs["store"].cat.codes)
    np.testing.assert_array_equal(collection.offsets, [0, 230, 331, 501])
    rows = np.random.default_rng(3).permutation(collection.n_obs)[:60]
    store_of_row, local = collection.locate(rows)
    np.testing.assert_array_equal(store_of_row, collection.store_index[rows])
    for row, index, local_row in zip(rows, store_of_row, local):
        store = CountStore(stores[index])
        assert store.obs_names[local_row] == collection.obs_names[row]
        own = store.read_csr(local_row, local_row + 1)
        mapped = collection.read_csr(row, row + 1)
        # the same values under the same gene names
        columns = collection.store_columns[index]
        kept = columns >= 0
        np.testing.assert_array_equal(own.toarray()[0, kept], mapped.toarray()[0, columns[kept]])
    with pytest.raises(IndexError):
        collection.locate([collection.n_obs])


def test_blocks_never_straddle_stores_and_start_on_their_chunks(stores):
    collection = StoreCollection(stores)
    for block_rows in (None, 16, 64):
        bounds = collection.block_bounds(block_rows)
        assert bounds[0] == 0 and bounds[-1] == collection.n_obs and np.all(np.diff(bounds) > 0)
        assert set(collection.offsets) <= set(bounds.tolist())
        for start, stop in zip(bounds[:-1], bounds[1:]):
            index = collection.store_index[start]
            assert collection.store_index[stop - 1] == index  # one store
            size = block_rows or collection.stores[index].chunk_rows
            assert (start - collection.offsets[index]) % size == 0  # aligned with that store's blocks
    assert collection.chunk_rows == 32


@pytest.mark.parametrize("join", ["inner", "outer"])
def test_samplers_over_a_collection_give_the_concatenated_cells(stores, join):
    collection = StoreCollection(stores, join=join)
    expected = _concat(stores, join=join).X.toarray()
    codes = collection.store_index.astype(np.int64)
    sequential = list(SequentialSampler(collection, batch_size=45, obs_arrays={"store": codes}, return_csr=True))
    np.testing.assert_array_equal(np.concatenate([mb["x"] for mb in sequential]), expected)
    through_dask = SequentialSampler(collection, batch_size=45, read_with="dask")
    np.testing.assert_array_equal(np.concatenate([mb["x"] for mb in through_dask]), expected)
    for minibatch in sequential:
        indptr, indices, data = minibatch["x_csr"]
        rebuilt = sp.csr_matrix((data, indices, indptr), shape=minibatch["x"].shape).toarray()
        np.testing.assert_array_equal(rebuilt, minibatch["x"])
    sampler = BlockShuffleSampler(
        collection, batch_size=32, block_rows=16, buffer_blocks=4, seed=1, obs_arrays={"store": codes}
    )
    for _ in range(2):  # two epochs
        seen = []
        for minibatch in sampler:
            np.testing.assert_array_equal(minibatch["x"], expected[minibatch["rows"]])
            np.testing.assert_array_equal(minibatch["library"], expected[minibatch["rows"]].sum(axis=1))
            np.testing.assert_array_equal(minibatch["store"], codes[minibatch["rows"]])
            seen.append(minibatch["rows"])
        seen = np.concatenate(seen)
        np.testing.assert_array_equal(np.sort(seen), np.arange(collection.n_obs))  # every cell once per epoch
        assert len(np.unique(codes[seen[:64]])) > 1  # blocks of all stores are drawn into the same buffers


class RecordingCollection(StoreCollection):
    """Records the row ranges the sampler asks for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = []

    def read_csr(self, start, stop):
        self.reads.append((start, stop))
        return super().read_csr(start, stop)


def test_sampler_blocks_follow_the_collection_block_bounds(stores):
    collection = RecordingCollection(stores)
    list(BlockShuffleSampler(collection, batch_size=32, block_rows=16, buffer_blocks=4))
    bounds = collection.block_bounds(16)
    for start, stop in collection.reads:
        block = np.searchsorted(bounds, start, side="right") - 1
        assert stop <= bounds[block + 1], (start, stop)


def test_library_statistics_match_the_concatenated_store(stores, tmp_path):
    collection = StoreCollection(stores)
    concatenated = write_store(_concat(stores), tmp_path / "concatenated.zarr", chunk_rows=40)
    codes = pd.Categorical(collection.obs_column("batch")).codes.astype(np.int64)
    n_batch = int(codes.max()) + 1
    for ours, theirs in zip(
        library_log_stats(collection, codes, n_batch), library_log_stats(concatenated, codes, n_batch)
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_given_genes_read_as_the_query_alignment_does(stores):
    from scvi_scale.data.aligned import AlignedStore

    reference_genes = ["g5", "nowhere"] + GENES[12:5:-1]
    with pytest.warns(UserWarning, match="missing from the query"):
        aligned = AlignedStore(stores[1], reference_genes)
    collection = StoreCollection([stores[1]], var_names=reference_genes)
    assert list(collection.var_names) == reference_genes and collection.describe()["join"] == "given"
    for start, stop in [(0, 101), (17, 60)]:
        np.testing.assert_array_equal(
            collection.read_csr(start, stop).toarray(), aligned.read_csr(start, stop).toarray()
        )


def test_pickles_describes_and_refuses_what_it_cannot_join(stores, tmp_path):
    collection = StoreCollection(stores, join="outer", label="study")
    restored = pickle.loads(pickle.dumps(collection))
    assert restored.var_names.equals(collection.var_names) and restored.label == "study"
    np.testing.assert_array_equal(restored.read_dense(200, 400), collection.read_dense(200, 400))
    description = json.loads(json.dumps(collection.describe()))
    assert description["join"] == "outer" and description["n_obs"] == 501 and description["n_vars"] == 26
    assert [store["n_genes_missing"] for store in description["stores"]] == [1, 2, 0]
    assert [store["first_row"] for store in description["stores"]] == [0, 230, 331]
    other = write_store(
        sp.csr_matrix(np.ones((3, 2), np.float32)), tmp_path / "other.zarr", var=pd.DataFrame(index=["x1", "x2"])
    )
    with pytest.raises(StoreError, match="share no gene"):
        StoreCollection([stores[0], other])
    with pytest.raises(StoreError, match="none of its 2 genes"):
        StoreCollection([stores[0], other], join="outer", var_names=GENES)
    with pytest.raises(ValueError, match="join='left'"):
        StoreCollection(stores, join="left")
    with pytest.raises(TypeError, match="not a single path"):
        StoreCollection(stores[0])
