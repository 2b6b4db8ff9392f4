"""Reference mapping (scArches) on the synthetic atlas: a reference trained on batches 0-2 is mapped onto held-out
batch 3, written as a separate store from the same generated atlas (same genes, cell types and batch model)."""

from __future__ import annotations

import pickle

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from scvi_scale.data import CountStore, StoreError, write_store
from scvi_scale.data.aligned import AlignedStore
from scvi_scale.datasets import synthetic_atlas
from scvi_scale.model import SCVI
from scvi_scale.outputs.labels import nearest_neighbours, transfer_labels, weighted_votes
from scvi_scale.outputs.writer import write_obs_column

N_GENES = 200
QUERY_BATCH = "batch_3"


def _write_subset(atlas: CountStore, rows, path, columns=None, extra_genes: int = 0, sparse: bool = True):
    """Rows of the atlas as their own store; `columns` reorders or drops genes, `extra_genes` appends genes the
    reference never saw (random counts)."""
    counts = atlas.read_csr(0, atlas.n_obs)[rows]
    names = atlas.var_names
    if columns is not None:
        counts, names = counts[:, columns], names[columns]
    if extra_genes:
        rng = np.random.default_rng(0)
        extra = rng.poisson(1.0, (counts.shape[0], extra_genes)).astype(np.float32)
        counts = np.hstack([counts.toarray(), extra])
        names = names.append(pd.Index([f"novel_{i}" for i in range(extra_genes)]))
    obs = pd.DataFrame(
        {
            "batch": atlas.obs_column("batch").astype(str).to_numpy()[rows],
            "cell_type": atlas.obs_column("cell_type").to_numpy()[rows],
        },
        index=atlas.obs_names[rows],
    )
    return write_store(counts, path, obs=obs, var=pd.DataFrame(index=names), sparse=sparse, chunk_rows=128)


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """Reference trained on batches 0-2, its saved directory, and the query model fine-tuned on batch 3."""
    folder = tmp_path_factory.mktemp("mapping")
    atlas = synthetic_atlas(folder / "atlas.zarr", n_cells=1000, n_genes=N_GENES, n_batches=4, n_cell_types=4, seed=3)
    batch = atlas.obs_column("batch").astype(str).to_numpy()
    reference_rows, query_rows = np.flatnonzero(batch != QUERY_BATCH), np.flatnonzero(batch == QUERY_BATCH)
    _write_subset(atlas, reference_rows, folder / "reference.zarr")
    _write_subset(atlas, query_rows, folder / "query.zarr")
    SCVI.setup_zarr(folder / "reference.zarr", batch_key="batch", labels_key="cell_type")
    reference = SCVI(folder / "reference.zarr", n_hidden=32, n_latent=6)
    reference.train(max_epochs=30, batch_size=128, seed=0, plan_kwargs={"lr": 1e-2})
    reference.save(folder / "reference_model")
    reference_state = {key: value.clone() for key, value in reference.module.state_dict().items()}
    query = SCVI.load_query_data(folder / "query.zarr", folder / "reference_model")
    initial_query_state = {key: value.clone() for key, value in query.module.state_dict().items()}
    query.train(max_epochs=10, batch_size=128, seed=0)  # default plan: Adam with weight_decay 1e-6
    return {
        "folder": folder,
        "atlas": atlas,
        "query_rows": query_rows,
        "reference": reference,
        "reference_state": reference_state,
        "initial_query_state": initial_query_state,
        "query": query,
    }


def test_query_cells_get_their_cell_types_by_label_transfer(mapped):
    query = mapped["query"]
    result = transfer_labels(mapped["reference"], query, k=15, write_to=False)
    truth = query.store.obs_column("cell_type").astype(str).to_numpy()
    accuracy = float(np.mean(result["predicted_cell_type"].astype(str).to_numpy() == truth))
    assert accuracy > 0.8
    uncertainty = result["predicted_cell_type_uncertainty"].to_numpy()
    assert np.all((uncertainty >= 0) & (uncertainty <= 1))
    wrong = result["predicted_cell_type"].astype(str).to_numpy() != truth
    if wrong.any():  # the kernel's uncertainty is informative: errors are less certain than hits
        assert uncertainty[wrong].mean() > uncertainty[~wrong].mean()


def test_frozen_reference_weights_stay_bit_identical(mapped):
    """Defaults: only the decoder's new batch columns and its batch norm learn. The run used Adam's weight decay,
    which would move frozen entries of a partly trainable weight without the step hook."""
    reference_state, query_module = mapped["reference_state"], mapped["query"].module
    query_state = query_module.state_dict()
    learned = {
        "decoder.px_decoder.fc_layers.Layer 0.1." + name
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    for key, before in reference_state.items():
        after = query_state[key]
        if key in learned or key.endswith("num_batches_tracked"):
            continue
        if after.shape != before.shape:  # the decoder's first layer: reference columns, then the new batch's
            assert key == "decoder.px_decoder.fc_layers.Layer 0.0.weight"
            assert after.shape[1] == before.shape[1] + 1
            after = after[:, : before.shape[1]]
        assert torch.equal(after, before), key
    first_layer = "decoder.px_decoder.fc_layers.Layer 0.0.weight"
    assert not torch.equal(query_state[first_layer][:, -1], mapped["initial_query_state"][first_layer][:, -1])
    trainable = {name for name, p in query_module.named_parameters() if p.requires_grad}
    first_block = "decoder.px_decoder.fc_layers.Layer 0."
    assert trainable == {first_block + "0.weight", first_block + "1.weight", first_block + "1.bias"}


def test_freeze_options_follow_scvi_tools(mapped):
    directory = mapped["folder"] / "reference_model"
    store = mapped["query"].store
    everything = SCVI.load_query_data(store, directory, unfrozen=True).module
    assert all(p.requires_grad for p in everything.parameters())
    opened = SCVI.load_query_data(
        store, directory, freeze_expression=False, freeze_dropout=True, freeze_batchnorm_encoder=False
    ).module
    names = {name for name, p in opened.named_parameters() if p.requires_grad}
    assert {
        "z_encoder.encoder.fc_layers.Layer 0.0.weight",
        "z_encoder.encoder.fc_layers.Layer 0.0.bias",
        "z_encoder.encoder.fc_layers.Layer 0.1.weight",
    } <= names
    assert "z_encoder.mean_encoder.weight" not in names and "decoder.px_scale_decoder.weight" not in names
    assert all(m.p == 0 for m in opened.modules() if isinstance(m, torch.nn.Dropout))
    frozen_norm = SCVI.load_query_data(store, directory).module.z_encoder.encoder.fc_layers[0][1]
    assert frozen_norm.momentum == 0


def test_unseen_gene_order_gives_the_same_latent(mapped, tmp_path):
    folder, atlas, rows = mapped["folder"], mapped["atlas"], mapped["query_rows"]
    mapped["query"].save(tmp_path / "query_model")
    permutation = np.random.default_rng(1).permutation(N_GENES)
    _write_subset(atlas, rows, tmp_path / "shuffled.zarr", columns=permutation)
    shuffled = SCVI.prepare_query_zarr(tmp_path / "shuffled.zarr", folder / "reference_model")
    in_order = SCVI.load(tmp_path / "query_model", folder / "query.zarr")
    reordered = SCVI.load(tmp_path / "query_model", shuffled)
    np.testing.assert_array_equal(reordered.get_latent_representation(), in_order.get_latent_representation())


@pytest.mark.parametrize("sparse", [True, False])
def test_missing_genes_warn_and_read_as_zeros_extra_genes_are_dropped(mapped, tmp_path, sparse):
    atlas, rows = mapped["atlas"], mapped["query_rows"][:50]
    kept = np.random.default_rng(2).permutation(N_GENES)[: N_GENES - 10]
    _write_subset(atlas, rows, tmp_path / "partial.zarr", columns=kept, extra_genes=5, sparse=sparse)
    with pytest.warns(UserWarning, match=f"10 of the reference's {N_GENES} genes are missing"):
        aligned = AlignedStore(tmp_path / "partial.zarr", atlas.var_names)
    assert aligned.n_vars == N_GENES and list(aligned.var_names) == list(atlas.var_names)
    expected = atlas.read_dense(0, atlas.n_obs)[rows]
    expected[:, np.setdiff1d(np.arange(N_GENES), kept)] = 0
    np.testing.assert_array_equal(aligned.read_dense(0, aligned.n_obs), expected)
    csr = aligned.read_csr(5, 40)
    np.testing.assert_array_equal(csr.toarray(), expected[5:40])
    assert csr.has_sorted_indices
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(aligned)).read_dense(0, 10), expected[:10])  # dask workers


def test_query_without_shared_genes_or_reference_without_batches_is_refused(mapped, tmp_path):
    atlas = mapped["atlas"]
    with pytest.raises(StoreError, match="none of its"):
        AlignedStore(atlas.path, [f"other_{i}" for i in range(5)])
    SCVI.setup_zarr(mapped["folder"] / "reference.zarr")
    no_batches = SCVI(mapped["folder"] / "reference.zarr", n_hidden=8, n_latent=2)
    with pytest.raises(StoreError, match="without a batch_key"):
        SCVI.load_query_data(mapped["folder"] / "query.zarr", no_batches)


def test_nearest_neighbours_match_brute_force_across_blocks(monkeypatch):
    import scvi_scale.outputs.labels as labels

    monkeypatch.setattr(labels, "KNN_REFERENCE_BLOCK", 7)
    monkeypatch.setattr(labels, "KNN_QUERY_BLOCK", 5)
    rng = np.random.default_rng(0)
    reference, query = rng.normal(size=(40, 3)), rng.normal(size=(12, 3))
    distances, indices = nearest_neighbours(reference, query, k=6)
    exact = np.sqrt(((query[:, None, :] - reference[None, :, :]) ** 2).sum(-1))
    np.testing.assert_array_equal(indices, np.argsort(exact, axis=1)[:, :6])
    np.testing.assert_allclose(distances, np.sort(exact, axis=1)[:, :6], rtol=1e-5)


def test_weighted_votes_follow_the_scarches_kernel():
    distances = np.array([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]])
    codes = np.array([[0, 1, 1], [0, 1, 2]])
    probabilities = weighted_votes(distances, codes, 3)
    spread = distances[0].std()
    weights = np.exp(-distances[0] / (2.0 / spread) ** 2)
    weights /= weights.sum()
    np.testing.assert_allclose(probabilities[0], [weights[0], weights[1] + weights[2], 0.0])
    np.testing.assert_allclose(probabilities[1], [1 / 3, 1 / 3, 1 / 3])


def test_predictions_are_written_to_obs_and_x_is_untouched(mapped, tmp_path, monkeypatch):
    import scvi_scale.outputs.writer as writer

    query = mapped["query"]
    store = tmp_path / "query.zarr"
    _write_subset(mapped["atlas"], mapped["query_rows"], store)
    counts_before = CountStore(store).read_dense(0, query.store.n_obs)
    result = transfer_labels(mapped["reference"], query, write_to=store)
    adata = anndata.read_zarr(store)
    pd.testing.assert_series_equal(adata.obs["predicted_cell_type"], result["predicted_cell_type"], check_names=False)
    np.testing.assert_array_equal(
        adata.obs["predicted_cell_type_uncertainty"].to_numpy(), result["predicted_cell_type_uncertainty"].to_numpy()
    )
    np.testing.assert_array_equal(np.asarray(adata.X.toarray()), counts_before)
    with pytest.raises(FileExistsError):
        write_obs_column(store, "predicted_cell_type", result["predicted_cell_type"])

    def crash(path):
        raise KeyboardInterrupt("killed before the consolidated metadata was rewritten")

    monkeypatch.setattr(writer, "reconsolidate", crash)
    with pytest.raises(KeyboardInterrupt):
        write_obs_column(store, "second_guess", pd.Series(np.zeros(query.store.n_obs)), overwrite=True)
    survived = anndata.read_zarr(store)  # still readable after the crash
    assert "predicted_cell_type" in survived.obs


def test_map_command_fine_tunes_saves_and_transfers_labels(mapped, tmp_path, monkeypatch):
    import argparse

    from scvi_scale.cli.query import add_commands

    store = tmp_path / "query.zarr"
    _write_subset(mapped["atlas"], mapped["query_rows"], store)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "map",
            str(store),
            "--reference",
            str(mapped["folder"] / "reference_model"),
            "--out",
            str(tmp_path / "out"),
            "--reference-store",
            str(mapped["folder"] / "reference.zarr"),
            "--labels-key",
            "cell_type",
            "--max-epochs",
            "2",
            "--accelerator",
            "cpu",
        ]
    )
    assert args.run(args) == 0
    adata = anndata.read_zarr(store)
    assert adata.obsm["X_scVI"].shape == (len(mapped["query_rows"]), 6)
    assert {"predicted_cell_type", "predicted_cell_type_uncertainty"} <= set(adata.obs.columns)
    reloaded = SCVI.load(tmp_path / "out", store)
    np.testing.assert_allclose(reloaded.get_latent_representation(), adata.obsm["X_scVI"], rtol=1e-6)


def test_gene_batch_dispersion_learns_for_new_batches_only(mapped, tmp_path):
    SCVI.setup_zarr(mapped["folder"] / "reference.zarr", batch_key="batch")
    reference = SCVI(mapped["folder"] / "reference.zarr", n_hidden=8, n_latent=2, dispersion="gene-batch")
    before = reference.module.px_r.detach().clone()
    query = SCVI.load_query_data(mapped["folder"] / "query.zarr", reference)
    initial = query.module.px_r.detach().clone()
    query.train(max_epochs=1, batch_size=128)
    after = query.module.px_r.detach()
    assert after.shape == (N_GENES, 4)
    assert torch.equal(after[:, :3], before) and torch.equal(initial[:, :3], before)
    assert not torch.equal(after[:, 3], initial[:, 3])


def _another_panel(mapped, path):
    """The query cells as a store with another gene panel: 30 reference genes missing, 5 of their own, shuffled."""
    kept = np.random.default_rng(4).permutation(N_GENES)[: N_GENES - 30]
    _write_subset(mapped["atlas"], mapped["query_rows"], path, columns=kept, extra_genes=5)
    return kept


def test_a_query_with_another_gene_panel_maps_as_the_scarches_tutorial_runs(mapped, tmp_path):
    """prepare_query_anndata in place, then what scArches users do next; the same query as a store maps to the
    same latent without being rewritten."""
    folder = mapped["folder"]
    _another_panel(mapped, tmp_path / "panel.zarr")
    query = anndata.read_zarr(tmp_path / "panel.zarr")
    assert SCVI.prepare_query_anndata(query, folder / "reference_model") is None
    assert list(query.var_names) == list(mapped["atlas"].var_names)
    vae_q = SCVI.load_query_data(query, folder / "reference_model", unfrozen=True)  # the encoder learns too
    from_model = SCVI.load_query_data(query.copy(), mapped["reference"], unfrozen=True)
    np.testing.assert_array_equal(from_model.get_latent_representation(), vae_q.get_latent_representation())
    with pytest.warns(UserWarning, match=f"30 of the reference's {N_GENES} genes are missing from the query"):
        store_query = SCVI.load_query_data(
            SCVI.prepare_query_zarr(tmp_path / "panel.zarr", folder / "reference_model"),
            folder / "reference_model",
            unfrozen=True,
        )
    initial_latent = vae_q.get_latent_representation()
    for model in (vae_q, store_query):  # the same shuffle blocks for both (an AnnData's default block is larger)
        model.train(max_epochs=3, batch_size=128, seed=0, block_rows=128, plan_kwargs={"weight_decay": 0.0})
    query_latent = vae_q.get_latent_representation()
    assert np.abs(query_latent - initial_latent).max() > 1e-3  # training moved the encoder
    np.testing.assert_allclose(store_query.get_latent_representation(), query_latent, rtol=1e-5, atol=1e-6)

    reference = anndata.read_zarr(folder / "reference.zarr")
    joint = anndata.concat([reference, query])
    joint_latent = vae_q.get_latent_representation(joint)
    np.testing.assert_allclose(joint_latent[reference.n_obs :], query_latent, rtol=1e-5, atol=1e-6)
    _, neighbours = nearest_neighbours(joint_latent[: reference.n_obs], query_latent, k=15)
    reference_types = reference.obs["cell_type"].astype(str).to_numpy()
    votes = [pd.Series(reference_types[row]).mode()[0] for row in neighbours]
    assert np.mean(np.asarray(votes) == query.obs["cell_type"].astype(str).to_numpy()) > 0.8

    vae_q.save(tmp_path / "query_model")
    again = SCVI.load(tmp_path / "query_model", adata=query)
    np.testing.assert_array_equal(again.get_latent_representation(), query_latent)


def test_map_command_maps_a_store_with_another_gene_panel_without_rewriting_it(mapped, tmp_path):
    import argparse

    from scvi_scale.cli.query import add_commands

    store = tmp_path / "panel.zarr"
    _another_panel(mapped, store)
    counts_before = CountStore(store).read_dense(0, len(mapped["query_rows"]))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "map",
            str(store),
            "--reference",
            str(mapped["folder"] / "reference_model"),
            "--out",
            str(tmp_path / "out"),
            "--max-epochs",
            "2",
            "--accelerator",
            "cpu",
        ]
    )
    with pytest.warns(UserWarning, match=f"30 of the reference's {N_GENES} genes are missing from the query"):
        assert args.run(args) == 0
    written = anndata.read_zarr(store)
    assert written.n_vars == N_GENES - 30 + 5  # the store keeps its own panel; only obsm was added
    np.testing.assert_array_equal(CountStore(store).read_dense(0, written.n_obs), counts_before)
    query = written.copy()
    SCVI.prepare_query_anndata(query, mapped["folder"] / "reference_model")
    through_anndata = SCVI.load(tmp_path / "out", adata=query).get_latent_representation()
    np.testing.assert_allclose(through_anndata, written.obsm["X_scVI"], rtol=1e-5, atol=1e-6)
