"""A model over a collection of stores: trained as one store of the concatenated cells would be, outputs written back
into the store each cell came from (issue: atlases come as many files)."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

from scvi_scale import SCVI
from scvi_scale.data import StoreCollection, write_store
from scvi_scale.datasets import synthetic_atlas
from scvi_scale.outputs import read_output

N_CELLS, N_GENES = 2400, 200


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Three stores of one atlas's cells: the second with its genes in another order, the third without gene_7;
    and one store of all cells in the genes every store has (what anndata.concat(join="inner") makes)."""
    folder = tmp_path_factory.mktemp("collection")
    atlas = anndata.read_zarr(
        synthetic_atlas(folder / "atlas.zarr", N_CELLS, n_genes=N_GENES, n_batches=3, seed=5, chunk_rows=256).path
    )
    parts = [atlas[:800].copy(), atlas[800:1700].copy(), atlas[1700:].copy()]
    parts[1] = parts[1][:, list(reversed(parts[1].var_names))].copy()
    parts[2] = parts[2][:, [name for name in parts[2].var_names if name != "gene_7"]].copy()
    paths = [write_store(part, folder / f"part_{index}.zarr", chunk_rows=256).path for index, part in enumerate(parts)]
    joined = anndata.concat(parts, join="inner")
    whole = write_store(joined, folder / "whole.zarr", chunk_rows=256).path
    return paths, whole


def train(data, seed=0):
    SCVI.setup_zarr(data, batch_key="batch")
    model = SCVI(data, n_latent=5, n_hidden=64)
    model.train(max_epochs=40, batch_size=128, seed=seed, plan_kwargs={"n_epochs_kl_warmup": 10})
    return model


def test_a_collection_trains_as_the_concatenated_store_and_writes_into_each_store(stores, tmp_path):
    paths, whole = stores
    collection = StoreCollection(paths)
    assert list(collection.var_names) == list(anndata.read_zarr(whole).var_names)  # gene_7 left out (inner join)
    many, one = train(paths), train(whole)
    held_out = np.sort(np.random.default_rng(1).choice(N_CELLS, 400, replace=False))
    elbo_many = many.get_elbo(indices=held_out)
    elbo_one = one.get_elbo(indices=held_out)
    assert abs(elbo_many - elbo_one) < 0.01 * abs(elbo_one)
    assert many.registry.collection["join"] == "inner" and len(many.registry.collection["stores"]) == 3

    written = many.get_latent_representation(write_to="X_scvi")
    latent = many.get_latent_representation()
    np.testing.assert_array_equal(np.asarray(written), latent)
    first = 0
    for path in paths:  # each store holds its own cells' rows, and anndata reads them
        n_obs = anndata.read_zarr(path).n_obs
        np.testing.assert_array_equal(np.asarray(read_output(path, "obsm/X_scvi")), latent[first : first + n_obs])
        np.testing.assert_array_equal(anndata.read_zarr(path).obsm["X_scvi"], latent[first : first + n_obs])
        first += n_obs
    de = many.differential_expression(groupby="cell_type", n_samples_overall=200, write_to="de_cell_type")
    assert all("de_cell_type" in anndata.read_zarr(path).uns for path in paths) and len(de)

    many.save(tmp_path / "model")
    reloaded = SCVI.load(tmp_path / "model")  # reopens the collection from the paths it recorded
    np.testing.assert_allclose(reloaded.get_latent_representation(), latent, rtol=1e-6)
