"""SCVI end to end over Zarr stores: learning, real data, save/load, resume after a kill, divergence, CLI."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvi_scale import SCVI
from scvi_scale.data import StoreError, write_store
from scvi_scale.datasets import synthetic_atlas
from scvi_scale.train import TrainingConfig, TrainingDivergedError, kl_weight, max_epochs_heuristic

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --- measures of a latent space (written here, independent of the package) ------------------------------------


def pairwise_distances(points: np.ndarray) -> np.ndarray:
    squared = (points**2).sum(1)
    return np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * points @ points.T, 0))


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette width (Rousseeuw 1987) with Euclidean distances."""
    distances = pairwise_distances(points)
    types = np.unique(labels)
    mean_to = np.stack([distances[:, labels == t].mean(1) for t in types], axis=1)  # (n, types)
    own = np.searchsorted(types, labels)
    counts = np.array([(labels == t).sum() for t in types])
    a = mean_to[np.arange(len(points)), own] * counts[own] / np.maximum(counts[own] - 1, 1)  # exclude self
    mean_to[np.arange(len(points)), own] = np.inf
    b = mean_to.min(1)
    return float(np.mean((b - a) / np.maximum(a, b)))


def knn(points: np.ndarray, k: int) -> np.ndarray:
    distances = pairwise_distances(points)
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1)[:, :k]


def other_batch_fraction(points, batches, k=15) -> float:
    """Fraction of each cell's k nearest neighbours that come from another batch (mixing; higher is mixed)."""
    return float((batches[knn(points, k)] != batches[:, None]).mean())


def knn_label_accuracy(points, labels, k=15) -> float:
    """Majority vote of the k nearest neighbours' labels against the cell's own label."""
    neighbours = labels[knn(points, k)]
    votes = np.array([np.bincount(row).argmax() for row in neighbours])
    return float((votes == labels).mean())


def log_pca(counts: np.ndarray, n_components: int) -> np.ndarray:
    """Uncorrected baseline: PCA of log1p of counts per 10k."""
    normalized = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    centred = normalized - normalized.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    return u[:, :n_components] * s[:n_components]


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("atlas") / "atlas.zarr"
    synthetic_atlas(path, n_cells=3000, n_genes=2000, n_batches=3, n_cell_types=5, seed=3)
    return path


@pytest.fixture(scope="module")
def trained(atlas, tmp_path_factory):
    SCVI.setup_zarr(atlas, batch_key="batch", labels_key="cell_type")
    model = SCVI(atlas)
    model.train(max_epochs=25, plan_kwargs={"n_epochs_kl_warmup": 10}, seed=1, check_val_every_n_epoch=1)
    return model


# --- unit behaviour ----------------------------------------------------------------------------------------------


def test_max_epochs_heuristic_and_kl_warmup_follow_scvi_tools():
    assert max_epochs_heuristic(10_000) == 400
    assert max_epochs_heuristic(100_000) == 80
    assert max_epochs_heuristic(10_000_000) == 1
    config = TrainingConfig(max_epochs=10)
    assert [kl_weight(config, e, 0) for e in (0, 200, 400, 800)] == [0.0, 0.5, 1.0, 1.0]
    by_steps = TrainingConfig(max_epochs=10, n_epochs_kl_warmup=None, n_steps_kl_warmup=100)
    assert kl_weight(by_steps, 5, 25) == pytest.approx(0.25)


def test_model_needs_setup_first(tmp_path):
    path = tmp_path / "a.zarr"
    synthetic_atlas(path, n_cells=200, n_genes=2000, seed=0)
    with pytest.raises(StoreError, match="setup_zarr"):
        SCVI(path)


def test_latent_library_refuses_a_batch_whose_library_cannot_vary(tmp_path):
    """A one-cell batch: the observed library (the default) trains; a latent library's per-batch prior would have
    variance 0, so it is refused naming the batch, before any training."""
    import anndata

    adata = anndata.read_zarr(synthetic_atlas(tmp_path / "a.zarr", n_cells=200, n_genes=200, seed=0).path)
    adata.obs["sample"] = pd.Categorical(["kept"] * 199 + ["lonely"])
    path = write_store(adata, tmp_path / "lonely.zarr").path
    SCVI.setup_zarr(path, batch_key="sample")
    SCVI(path, n_latent=4).train(max_epochs=1)
    with pytest.raises(ValueError, match=r"\['lonely'\] of 'sample' have log library sizes of variance 0"):
        SCVI(path, use_observed_lib_size=False)


def test_setup_anndata_trains_on_an_in_memory_anndata(tmp_path):
    import anndata

    path = tmp_path / "a.zarr"
    synthetic_atlas(path, n_cells=300, n_genes=2000, seed=6)
    adata = anndata.read_zarr(path)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0.5  # not counts: the layer is what gets registered
    with pytest.raises(StoreError, match="setup_anndata"):
        SCVI(adata)
    SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = SCVI(adata, n_latent=4)
    model.train(max_epochs=1)
    assert model.get_latent_representation().shape == (300, 4)
    np.testing.assert_array_equal(model.store.read_dense(0, 300), adata.layers["counts"].toarray())


# --- learning ---------------------------------------------------------------------------------------------------


def test_latent_separates_cell_types_and_mixes_batches(trained):
    latent = trained.get_latent_representation()
    store = trained.store
    types = store.obs_column("cell_type").cat.codes.to_numpy()
    batches = store.obs_column("batch").cat.codes.to_numpy()
    counts = store.read_dense(0, store.n_obs)
    random_projection = np.log1p(counts) @ np.random.default_rng(0).normal(size=(store.n_vars, latent.shape[1]))
    pca = log_pca(counts, latent.shape[1])

    latent_silhouette = silhouette(latent, types)
    assert latent_silhouette > 0.15
    assert latent_silhouette > silhouette(random_projection, types) + 0.1
    assert knn_label_accuracy(latent, types) > 0.9
    # batch mixing: well above the uncorrected PCA's, and a sizeable share of what full mixing would give
    expected_if_mixed = 1 - np.sum(np.bincount(batches) ** 2) / len(batches) ** 2
    mixing = other_batch_fraction(latent, batches)
    assert mixing > other_batch_fraction(pca, batches) + 0.1
    assert mixing > 0.5 * expected_if_mixed


def test_history_and_held_out_elbo_improves(trained):
    history = trained.history
    for key in (
        "elbo_train",
        "elbo_validation",
        "reconstruction_loss_train",
        "reconstruction_loss_validation",
        "kl_local_train",
        "kl_local_validation",
    ):
        assert len(history[key]) == 25, key
    validation = history["elbo_validation"]["elbo_validation"].to_numpy()
    assert validation[-1] < validation[0] * 0.8
    # the last validation ELBO equals get_elbo on the validation cells up to the Monte Carlo noise of z
    assert -trained.get_elbo(indices=trained.validation_indices) == pytest.approx(validation[-1], rel=5e-3)


def test_elbo_reconstruction_and_marginal_ll_are_consistent(trained):
    cells = np.arange(0, 3000, 50)
    torch.manual_seed(0)  # the same draw of z for both, so they differ by the KL term exactly
    elbo = trained.get_elbo(indices=cells, return_mean=False)
    torch.manual_seed(0)
    reconstruction = trained.get_reconstruction_error(indices=cells, return_mean=False)["reconstruction_loss"]
    marginal = trained.get_marginal_ll(indices=cells, n_mc_samples=50, return_mean=False)
    assert elbo.shape == reconstruction.shape == marginal.shape == (len(cells),)
    assert np.all(-elbo >= reconstruction - 1e-3)  # the KL term is non-negative
    # importance sampling tightens the bound: log p(x) estimate >= ELBO on average
    assert marginal.mean() > elbo.mean()


def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "model")
    with pytest.raises(FileExistsError):
        trained.save(tmp_path / "model")
    loaded = SCVI.load(tmp_path / "model", trained.store.path)
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained.get_latent_representation())
    assert loaded.history_ == trained.history_
    assert "trained" in repr(loaded)


# --- real data ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED_DATA / "cellbench_3cl.h5ad").exists(), reason="../shared/data is absent")
def test_cellbench_platforms_mix_and_cell_lines_separate(tmp_path):
    import anndata

    # As scVI is used in practice: the 2,000 most variable genes of the 15,073, ranked by the variance of log counts
    # per 10k within each platform (averaged), so that genes differing between platforms are not picked for that.
    shutil.copy(SHARED_DATA / "cellbench_3cl.h5ad", tmp_path / "cellbench.h5ad")
    adata = anndata.read_h5ad(tmp_path / "cellbench.h5ad")
    counts = adata.X.toarray()
    log_normalized = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    platform = adata.obs["batch"].to_numpy()
    within = np.mean([log_normalized[platform == p].var(0) for p in np.unique(platform)], axis=0)
    variable = np.sort(np.argsort(within)[-2000:])
    store_path = tmp_path / "cellbench.zarr"
    write_store(adata[:, variable].copy(), store_path)

    SCVI.setup_zarr(store_path, batch_key="batch", labels_key="cell_line")
    model = SCVI(store_path)
    model.train(max_epochs=300, plan_kwargs={"n_epochs_kl_warmup": 100}, seed=0)
    latent = model.get_latent_representation()

    lines = model.store.obs_column("cell_line").cat.codes.to_numpy()
    platforms = model.store.obs_column("batch").cat.codes.to_numpy()
    pca = log_pca(model.store.read_dense(0, model.store.n_obs), 10)
    # the uncorrected PCA keeps the platforms apart; scVI mixes them and keeps the cell lines apart
    assert other_batch_fraction(latent, platforms) > other_batch_fraction(pca, platforms) + 0.15
    assert knn_label_accuracy(latent, lines) > 0.9
    assert silhouette(latent, lines) > silhouette(latent, platforms) + 0.1


# --- resume, divergence, CLI ------------------------------------------------------------------------------------

RESUME_SCRIPT = """
import sys, torch
from scvi_scale import SCVI
SCVI.setup_zarr(sys.argv[1], batch_key="batch")
torch.set_num_threads(1)  # as the test process (conftest), so float sums round alike
SCVI(sys.argv[1]).train(max_epochs=3, batch_size=64, checkpoint_dir=sys.argv[2], seed=5,
                        checkpoint_every_n_steps=4, check_val_every_n_epoch=1)
"""


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    store = tmp_path / "a.zarr"
    synthetic_atlas(store, n_cells=1200, n_genes=2000, seed=1)
    SCVI.setup_zarr(store, batch_key="batch")
    uninterrupted = SCVI(store)  # the initial weights come from settings.seed (0), in the killed runs too
    uninterrupted.train(max_epochs=3, batch_size=64, seed=5, check_val_every_n_epoch=1)

    run_dir = tmp_path / "run"
    env = {**os.environ, "SCVI_SCALE_PROGRESS": "0"}
    process = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(store), str(run_dir)], env=env)
    checkpoint = run_dir / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["state"]["global_step"] >= 20:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(checkpoint, weights_only=False)["state"]
    assert 0 < saved["global_step"] < 3 * 17, "the kill should land mid-training"

    resumed = SCVI(store)
    resumed.train(max_epochs=3, batch_size=64, seed=5, checkpoint_dir=run_dir, resume=True, check_val_every_n_epoch=1)
    for (name, a), (_, b) in zip(uninterrupted.module.state_dict().items(), resumed.module.state_dict().items()):
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name} (killed at step {saved['global_step']}): {m}"
        )
    for key in ("elbo_train", "elbo_validation"):
        np.testing.assert_allclose(
            [v for _, v in resumed.history_[key]], [v for _, v in uninterrupted.history_[key]], rtol=1e-5
        )


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    store = tmp_path / "a.zarr"
    synthetic_atlas(store, n_cells=600, n_genes=2000, seed=2)
    SCVI.setup_zarr(store, batch_key="batch")
    model = SCVI(store)
    healthy_loss = model.module.loss
    training_calls = []

    def loss_turning_nan(tensors, kl_weight=1.0):
        """The real loss, made NaN from the 3rd training step of the second epoch on."""
        losses = healthy_loss(tensors, kl_weight)
        if model.module.training:
            training_calls.append(1)
            if len(training_calls) > 5 + 2:  # 540 training cells at batch 128: 5 steps per epoch
                losses["loss"] = losses["loss"] * float("nan")
        return losses

    model.module.loss = loss_turning_nan
    with pytest.raises(TrainingDivergedError, match="epoch 1, step 2"):
        model.train(max_epochs=3, checkpoint_dir=tmp_path / "run")
    kept = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert kept["train_stream"]["epoch"] == 1 and kept["state"]["global_step"] == 5  # the stream owns the position
    assert all(torch.isfinite(value).all() for value in kept["module"].values() if value.is_floating_point())


# --- divergence ---------------------------------------------------------------------------------------------------


@pytest.fixture
def small_store(tmp_path) -> Path:
    path = synthetic_atlas(
        tmp_path / "small.zarr", n_cells=600, n_genes=50, n_batches=2, n_cell_types=3, seed=2, chunk_rows=64
    ).path
    SCVI.setup_zarr(path, batch_key="batch")
    return path


def finite_elbo_at(store: Path, weights: dict) -> float:
    """The negative ELBO per cell of the model `weights` over `store` (a model with the weights loaded)."""
    model = SCVI(store, n_hidden=16, n_latent=4)
    model.module.load_state_dict(weights)
    return -model.get_elbo()


def test_a_diverging_run_keeps_its_last_healthy_checkpoint_and_resumes_with_a_lower_lr(small_store, tmp_path, caplog):
    """Five healthy steps at lr 1e-3 (checkpoint after each), then a resume at lr 1e3: its first update throws the
    weights far off (the next loss is NaN). The checkpoint kept holds step 5's weights, and the error names it; a
    resume at lr 1e-4 continues from it, says the lr changed, and finishes."""
    run = tmp_path / "run"
    options = dict(max_epochs=3, checkpoint_dir=run, checkpoint_every_n_steps=1)
    model = SCVI(small_store, n_hidden=16, n_latent=4)
    model.train(**options, max_steps=5)
    healthy = torch.load(run / "checkpoint.pt", weights_only=False)
    assert healthy["state"]["global_step"] == 5
    with caplog.at_level("WARNING", logger="scvi_scale.train"):
        # 540 training cells: 5 steps an epoch; step 6 (epoch 1, step 0) diverges, the next loss is NaN
        with pytest.raises(
            TrainingDivergedError,
            match=rf"epoch 1, step 1 .*healthy checkpoint is kept at "
            rf"{run / 'checkpoint.pt'}",
        ):
            model.train(**options, resume=True, plan_kwargs={"lr": 1e3})
    assert "lr 0.001 -> 1000" in caplog.text
    diverged = model.module.state_dict()
    assert not all(
        torch.isfinite(value).all() and value.abs().max() < 100
        for value in diverged.values()
        if value.is_floating_point()
    )  # the run did diverge
    kept = torch.load(run / "checkpoint.pt", weights_only=False)
    assert kept["state"]["global_step"] == 5
    for name, value in healthy["module"].items():
        assert torch.equal(kept["module"][name], value), name
    assert math.isfinite(finite_elbo_at(small_store, kept["module"]))

    caplog.clear()
    resumed = SCVI(small_store, n_hidden=16, n_latent=4)
    with caplog.at_level("WARNING", logger="scvi_scale.train"):
        resumed.train(**options, resume=True, plan_kwargs={"lr": 1e-4})
    assert "lr 1000 -> 0.0001" in caplog.text  # the checkpoint at epoch 0's end was written by the lr 1e3 run
    assert [epoch for epoch, _ in resumed.history_["train_loss"]] == [0, 1, 2]
    assert all(
        torch.isfinite(value).all() for value in resumed.module.state_dict().values() if value.is_floating_point()
    )


def test_a_run_diverging_before_any_healthy_checkpoint_keeps_none_and_says_so(small_store, tmp_path):
    """lr 1e3 from the start: the first update already diverges, so no checkpoint is healthy, none is written, and
    the error names no file (checkpoint_every_n_steps=1: the step-1 checkpoint would hold the diverged weights)."""
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as raised:
        SCVI(small_store, n_hidden=16, n_latent=4).train(
            max_epochs=2, checkpoint_dir=run, checkpoint_every_n_steps=1, plan_kwargs={"lr": 1e3}
        )
    assert not (run / "checkpoint.pt").exists()
    message = str(raised.value)
    assert (
        "no healthy checkpoint" in message and "checkpoint.pt" not in message and "pass checkpoint_dir" not in message
    )


def test_checkpointing_does_not_change_the_trained_model(small_store, tmp_path):
    """A checkpoint after every step (with its health check) leaves the weights an unchecked run reaches."""
    plain = SCVI(small_store, n_hidden=16, n_latent=4)
    plain.train(max_epochs=2, seed=4)
    checked = SCVI(small_store, n_hidden=16, n_latent=4)
    checked.train(max_epochs=2, seed=4, checkpoint_dir=tmp_path / "run", checkpoint_every_n_steps=1)
    for name, value in plain.module.state_dict().items():
        assert torch.equal(checked.module.state_dict()[name], value), name


# --- the command line -------------------------------------------------------------------------------------------


def test_cli_trains_k_times_128_plus_1_cells_to_the_end(tmp_path, capsys):
    """285 cells: 257 = 2 * 128 + 1 train (ceil(0.9 * 285)); the leftover cell joins the last minibatch (two steps an
    epoch), where a 1-cell minibatch would break BatchNorm."""
    from scvi_scale.cli import main

    store = synthetic_atlas(tmp_path / "a.zarr", n_cells=285, n_genes=50, n_batches=2, n_cell_types=3, seed=6).path
    out = tmp_path / "model"
    assert main(["train", str(store), "--batch-key", "batch", "--out", str(out), "--max-epochs", "2"]) == 0
    saved = torch.load(out / "model.pt", weights_only=False)["attr_dict"]
    assert len(saved["train_indices_"]) == 2 * 128 + 1
    assert [epoch for epoch, _ in saved["history_"]["train_loss"]] == [0, 1]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["state"]["global_step"] == 2 * 2


def test_an_object_batch_column_with_nan_is_refused_naming_the_rows(tmp_path):
    """NaN in a column of strings would become a batch named 'nan' (anndata writes it as that string)."""
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"sample": np.array(["s1", "s2"] * 100, dtype=object)}, index=[f"c{i}" for i in range(200)])
    obs.loc[["c3", "c17"], "sample"] = np.nan
    adata = anndata.AnnData(
        sp.csr_matrix(rng.poisson(1.0, (200, 30)).astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=[f"g{i}" for i in range(30)]),
    )
    with pytest.raises(StoreError, match=r"'sample' has missing values .* rows \[3, 17\] \(cells \['c3', 'c17'\]\)"):
        SCVI.setup_anndata(adata, batch_key="sample")
    with pytest.raises(StoreError, match=r"'sample' \(strings\) has missing values .* rows \[3, 17\]"):
        write_store(adata, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_cli_train_writes_a_loadable_model(tmp_path):
    store = tmp_path / "a.zarr"
    synthetic_atlas(store, n_cells=500, n_genes=2000, seed=4)
    out = tmp_path / "model"
    command = [
        sys.executable,
        "-m",
        "scvi_scale.cli",
        "train",
        str(store),
        "--batch-key",
        "batch",
        "--out",
        str(out),
        "--max-epochs",
        "2",
        "--n-latent",
        "5",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "SCVI_SCALE_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr
    assert '"epochs": 2' in result.stdout
    SCVI.setup_zarr(store, batch_key="batch")
    assert SCVI.load(out, store).get_latent_representation().shape == (500, 5)
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr


def test_a_model_over_a_store_never_reads_x_whole(tmp_path, monkeypatch):
    """The out-of-core promise: training, the latent, normalized expression and DE read X in row blocks only."""
    from scvi_scale.data import CountStore

    path = synthetic_atlas(
        tmp_path / "blocks.zarr", n_cells=1200, n_genes=200, n_batches=2, seed=4, chunk_rows=200
    ).path
    reads = []
    real_read = CountStore.read_raw
    monkeypatch.setattr(
        CountStore, "read_raw", lambda self, start, stop: reads.append(stop - start) or real_read(self, start, stop)
    )
    SCVI.setup_zarr(path, batch_key="batch", labels_key="cell_type")
    model = SCVI(path, n_latent=4, n_hidden=32)
    model.train(max_epochs=1)
    model.get_latent_representation()
    model.get_normalized_expression(return_numpy=True)
    model.differential_expression(groupby="cell_type", n_samples_overall=100)
    assert reads and max(reads) <= 200
