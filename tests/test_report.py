"""The report: history table and loss curves, the scIB metrics against scib-metrics' own pipeline and float64
references, and whole reports of a trained SCVI on a synthetic atlas and on CellBench (JSON and HTML)."""

from __future__ import annotations

import base64
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_scale import SCVI
from scvi_scale.datasets import synthetic_atlas
from scvi_scale.report import build_report, log_normalize, missing_extra, subsample_rows, write_history_table
from scvi_scale.report.history import metric_families, plot_loss_curves
from scvi_scale.report.html import SECTIONS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_extra = pytest.mark.skipif(missing_extra() is not None, reason=str(missing_extra()))
needs_matplotlib = pytest.mark.skipif(missing_extra(("matplotlib",)) is not None, reason="matplotlib is absent")


def a_history(n_epochs: int = 6) -> dict:
    """A history shaped like the training loop's: validation every other epoch, times per epoch."""
    return {
        "elbo_train": [(e, 900.0 / (e + 1) + 300) for e in range(n_epochs)],
        "elbo_validation": [(e, 950.0 / (e + 1) + 310) for e in range(1, n_epochs, 2)],
        "reconstruction_loss_train": [(e, 880.0 / (e + 1) + 290) for e in range(n_epochs)],
        "kl_local_train": [(e, 20.0 + e) for e in range(n_epochs)],
        "kl_weight": [(e, e / 400) for e in range(n_epochs)],
        "lr": [(e, 1e-3) for e in range(n_epochs)],
        "epoch_seconds": [(e, 0.5 + 0.1 * e) for e in range(n_epochs)],
    }


# --- history: the table and the curves (core install) -------------------------------------------------------------


def test_history_table_holds_every_value_and_blanks_where_a_metric_was_not_computed(tmp_path):
    history = a_history()
    path = write_history_table(history, tmp_path)
    assert path == tmp_path / "history.csv" and [p.name for p in tmp_path.iterdir()] == ["history.csv"]
    table = pd.read_csv(path, index_col="epoch")
    assert list(table.index) == list(range(6)) and list(table.columns) == list(history)
    for key, pairs in history.items():
        recorded = {epoch: value for epoch, value in pairs}
        for epoch in range(6):
            if epoch in recorded:
                assert table.loc[epoch, key] == pytest.approx(recorded[epoch], rel=1e-8), (key, epoch)
            else:
                assert math.isnan(table.loc[epoch, key]), (key, epoch)


def test_history_is_checked_naming_the_bad_entry(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_history_table({"elbo_train": []}, tmp_path)
    with pytest.raises(ValueError, match=r"history\['kl_weight'\]\[1\]"):
        write_history_table({"kl_weight": [(0, 0.0), (0.5, 0.1)]}, tmp_path)
    assert not (tmp_path / "history.csv").exists()


@needs_matplotlib
def test_loss_curves_draw_a_row_per_metric_family_against_epochs_and_wall_time(tmp_path):
    from matplotlib.image import imread

    history = a_history()
    families = metric_families(history)
    assert families == [
        ("elbo", ["elbo_train", "elbo_validation"]),
        ("reconstruction_loss", ["reconstruction_loss_train"]),
        ("kl_local", ["kl_local_train"]),
        ("kl_weight", ["kl_weight"]),
        ("lr", ["lr"]),
    ]
    image = imread(plot_loss_curves(history, tmp_path / "curves.png"))
    # two columns of 5.6 in and a row of 2.3 in per family (+0.6 in), at 100 dpi
    assert image.shape[:2] == (round(100 * (0.6 + 2.3 * len(families))), 2 * 560)
    assert image[..., :3].std() > 0.05  # drawn, not blank
    without_times = {key: pairs for key, pairs in history.items() if key != "epoch_seconds"}
    assert imread(plot_loss_curves(without_times, tmp_path / "epochs.png")).shape[1] == 560


def test_missing_extra_names_the_install_command_and_stops_the_report_before_work(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "umap" else real_find_spec(name))
    message = missing_extra()
    assert "umap-learn" in message and "pip install 'scvi-scale[report]'" in message
    assert "scib-metrics" not in message or real_find_spec("scib_metrics") is None
    with pytest.raises(ImportError, match=r"umap-learn.*scvi-scale\[report\]"):
        build_report(
            tmp_path / "out",
            latent=np.zeros((5, 2)),
            obs=pd.DataFrame(index=range(5)),
            batch_key=None,
            labels_key=None,
            history=a_history(),
            run={},
            outputs=[],
            counts_for_baseline=np.zeros((5, 3)),
        )
    assert not (tmp_path / "out").exists()


@needs_extra
def test_bad_input_is_refused_before_any_work(tmp_path):
    obs = pd.DataFrame({"batch": pd.Categorical(["a", "b"] * 100), "library_size": np.ones(200)})
    arguments = dict(
        obs=obs,
        batch_key="batch",
        labels_key=None,
        history=a_history(),
        run={},
        outputs=[],
        counts_for_baseline=np.ones((200, 3)),
    )
    with pytest.raises(ValueError, match="latent has 199 rows but obs has 200"):
        build_report(tmp_path / "out", latent=np.zeros((199, 4)), **arguments)
    with pytest.raises(ValueError, match=r"no column 'cell_type' \(labels_key\)"):
        build_report(tmp_path / "out", latent=np.zeros((200, 4)), **{**arguments, "labels_key": "cell_type"})
    with pytest.raises(ValueError, match="counts_for_baseline has 100 rows but there are 200 cells"):
        build_report(
            tmp_path / "out", latent=np.zeros((200, 4)), **{**arguments, "counts_for_baseline": np.ones((100, 3))}
        )
    latent = np.zeros((200, 4))
    latent[[7, 150]] = np.nan
    with pytest.raises(ValueError, match=r"latent is not finite in 2 cells, first rows \[7, 150\]"):
        build_report(tmp_path / "out", latent=latent, **arguments)
    assert not (tmp_path / "out").exists()


def test_subsample_is_seeded_uniform_and_bounded():
    rows = subsample_rows(100_000, 5_000, seed=3)
    assert len(rows) == 5_000 and rows.dtype == np.int64
    assert np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < 100_000
    np.testing.assert_array_equal(rows, subsample_rows(100_000, 5_000, seed=3))
    assert len(np.intersect1d(rows, subsample_rows(100_000, 5_000, seed=4))) < 500  # ~250 expected by chance
    assert abs(np.mean(rows < 50_000) - 0.5) < 0.03  # uniform: half fall in each half
    np.testing.assert_array_equal(subsample_rows(300, 5_000, seed=3), np.arange(300))


def test_log_normalize_matches_the_float64_formula_for_csr_and_dense():
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.7, size=(50, 30)).astype(np.float64)
    counts[4] = 0  # a cell without counts stays at 0
    totals = counts.sum(1, keepdims=True)
    expected = np.log1p(np.divide(counts * 1e4, totals, out=np.zeros_like(counts), where=totals > 0))
    sparse = log_normalize(sp.csr_matrix(counts))
    assert sp.issparse(sparse) and sparse.dtype == np.float32
    np.testing.assert_allclose(sparse.toarray(), expected, rtol=1e-6)
    np.testing.assert_allclose(log_normalize(counts), expected, rtol=1e-6)


@needs_extra
@pytest.mark.slow  # pynndescent's numba compilation: ~30 s once per process
def test_approximate_neighbours_above_the_exact_limit_find_the_exact_ones(monkeypatch):
    from scvi_scale.report import metrics

    rng = np.random.default_rng(0)
    points = (rng.normal(size=(3000, 10)) + 3 * rng.normal(size=(8, 10))[rng.integers(0, 8, 3000)]).astype(np.float32)
    exact = metrics.nearest_neighbors(points)
    monkeypatch.setattr(metrics, "EXACT_NEIGHBORS_MAX_CELLS", 1000)
    assert metrics.neighbor_search(3000) == "approximate (pynndescent)"
    approximate = metrics.nearest_neighbors(points, seed=0)
    assert approximate.indices.shape == exact.indices.shape == (3000, 90)
    np.testing.assert_array_equal(approximate.indices[:, 0], np.arange(3000))  # itself first, as the exact search
    recall = np.mean([len(np.intersect1d(a, e)) / 90 for a, e in zip(approximate.indices, exact.indices)])
    assert recall > 0.99
    np.testing.assert_allclose(approximate.distances[:, -1], exact.distances[:, -1], rtol=0.05)


# --- whole reports of a trained model ---------------------------------------------------------------------------


def train_and_describe(store_path: Path, batch_key: str, labels_key: str, max_epochs: int, warmup: int) -> dict:
    """Train a small SCVI as a user would and gather what build_report takes (all but out_dir)."""
    SCVI.setup_zarr(store_path, batch_key=batch_key, labels_key=labels_key)
    model = SCVI(store_path)  # settings.seed (0) draws the initial weights: the same model whichever tests ran before
    start = time.perf_counter()
    model.train(max_epochs=max_epochs, plan_kwargs={"n_epochs_kl_warmup": warmup}, seed=1, check_val_every_n_epoch=1)
    seconds = time.perf_counter() - start
    latent = model.get_latent_representation()
    counts = model.store.read_csr(0, model.store.n_obs)
    obs = pd.DataFrame(
        {
            batch_key: model.store.obs_column(batch_key).to_numpy(),
            labels_key: model.store.obs_column(labels_key).to_numpy(),
            "library_size": np.asarray(counts.sum(axis=1)).ravel(),
        }
    )
    run = {
        "cells_per_second": model.store.n_obs * max_epochs / seconds,
        "seconds": seconds,
        "device": "cpu",
        "threads": 1,
        "peak_rss_bytes": 1_234_567_890,
    }
    outputs = [
        {"entry": "obsm/X_scvi", "kind": "obsm", "shape": list(latent.shape), "bytes": latent.nbytes, "complete": True}
    ]
    return dict(
        latent=latent,
        obs=obs,
        batch_key=batch_key,
        labels_key=labels_key,
        history=model.history_,
        run=run,
        outputs=outputs,
        counts=counts,
    )


def assert_report_is_whole(report: dict, out_dir: Path) -> None:
    """The JSON on disk is the one returned; every score in [0, 1]; the HTML names every section and embeds
    every image, and asks for nothing outside itself."""
    assert json.loads((out_dir / "report.json").read_text()) == report
    for embedding in ("scvi", "pca"):
        scores = report["scib"]["scores"][embedding]
        aggregate = report["scib"]["aggregate"][embedding]
        for name, value in {**scores, **aggregate}.items():
            assert 0.0 <= value <= 1.0 + 1e-6, (embedding, name, value)
        batch = [scores[n] for n in report["scib"]["categories"]["Batch correction"] if n in scores]
        assert aggregate["Batch correction"] == pytest.approx(np.mean(batch))
        if "Total" in aggregate:
            bio = [scores[n] for n in report["scib"]["categories"]["Bio conservation"] if n in scores]
            assert aggregate["Total"] == pytest.approx(0.4 * np.mean(batch) + 0.6 * np.mean(bio))
    assert report["scib"]["scores"]["pca"]["PCR comparison"] == 0.0  # the baseline is the pre-integration embedding
    page = (out_dir / "report.html").read_text()
    for key, title in SECTIONS.items():
        assert f'<section id="{key}"><h2>{title}</h2>' in page
    assert set(report["images"]) >= {"history", "umap", "scib"}
    for name in report["images"].values():
        encoded = base64.b64encode((out_dir / name).read_bytes()).decode("ascii")
        assert f'src="data:image/png;base64,{encoded}"' in page, name
    assert page.count("<img ") == len(report["images"])
    for outside in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert outside not in page, outside
    assert (out_dir / "history.csv").exists()


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("atlas") / "atlas.zarr"
    synthetic_atlas(store, n_cells=1500, n_genes=1000, n_batches=3, n_cell_types=5, seed=3)
    # 20 epochs underfit: over initial-weight seeds 0-2, 40 epochs put scVI's iLISI at ~0.62 against PCA's 0.52
    return train_and_describe(store, "batch", "cell_type", max_epochs=40, warmup=10)


@pytest.fixture(scope="module")
def synthetic_report(synthetic_run, tmp_path_factory):
    pytest.importorskip("scib_metrics", reason=str(missing_extra()))
    out_dir = tmp_path_factory.mktemp("report")
    counts = synthetic_run["counts"]
    arguments = {key: value for key, value in synthetic_run.items() if key != "counts"}
    # the callable form: only the subsampled rows are normalised
    report = build_report(
        out_dir, **arguments, counts_for_baseline=lambda rows: log_normalize(counts[rows]), max_cells=1200, seed=0
    )
    return report, out_dir


@needs_extra
def test_synthetic_report_scores_the_latent_above_the_uncorrected_baseline(synthetic_report):
    report, out_dir = synthetic_report
    assert_report_is_whole(report, out_dir)
    assert report["cells"] == {"n_cells": 1500, "subsample": 1200, "max_cells": 1200, "seed": 0}
    from matplotlib.image import imread

    assert imread(out_dir / "umap.png").shape[1] == 3 * 540  # batch, label and library size
    scvi, pca = report["scib"]["scores"]["scvi"], report["scib"]["scores"]["pca"]
    assert set(scvi) == {
        "iLISI",
        "PCR comparison",
        "Silhouette batch",
        "Graph connectivity",
        "cLISI",
        "Silhouette label",
        "KMeans NMI",
        "KMeans ARI",
    }
    # planted batch effects: scVI mixes the batches better than PCA of the log counts (over initial-weight
    # seeds 0-2 at 40 epochs, iLISI ~0.62 against 0.52)
    assert scvi["iLISI"] > pca["iLISI"] + 0.03
    assert scvi["PCR comparison"] > 0.0
    assert scvi["KMeans ARI"] > 0.8 and scvi["cLISI"] > 0.95  # and keeps the five cell types apart
    assert report["history_summary"]["epochs"] == 40
    assert report["history"]["elbo_validation"][-1][1] < report["history"]["elbo_validation"][0][1]
    assert report["run"]["peak_rss_bytes"] == 1_234_567_890 and report["outputs"][0]["entry"] == "obsm/X_scvi"


@needs_extra
def test_a_failed_rerun_leaves_no_page_of_the_earlier_report(synthetic_run, synthetic_report, tmp_path):
    shutil.copytree(synthetic_report[1], tmp_path / "report")

    def counts_that_fail(rows):
        raise OSError("the store went away")

    arguments = {key: value for key, value in synthetic_run.items() if key != "counts"}
    with pytest.raises(OSError, match="went away"):
        build_report(
            tmp_path / "report", **arguments, counts_for_baseline=counts_that_fail, max_cells=1200, overwrite=True
        )
    assert not (tmp_path / "report" / "report.html").exists()


@needs_extra
def test_metrics_equal_scib_metrics_benchmarker_on_the_same_cells(synthetic_run, synthetic_report):
    """Our calls against scib-metrics' own pipeline (the Benchmarker, given the same exact neighbours and baseline),
    and silhouette batch, which the Benchmarker no longer runs, against scikit-learn's silhouette in float64."""
    import anndata
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation
    from sklearn.metrics import silhouette_samples

    from scvi_scale.report.metrics import nearest_neighbors, pca_baseline

    report, _ = synthetic_report
    rows = subsample_rows(1500, 1200, seed=0)
    latent = synthetic_run["latent"][rows].astype(np.float32)
    baseline = pca_baseline(log_normalize(synthetic_run["counts"][rows]), latent.shape[1], seed=0)
    obs = synthetic_run["obs"].iloc[rows].reset_index(drop=True)
    obs.index = obs.index.astype(str)
    adata = anndata.AnnData(baseline, obs=obs, obsm={"scvi": latent, "pca": baseline})
    benchmarker = Benchmarker(
        adata,
        "batch",
        "cell_type",
        ["scvi", "pca"],
        pre_integrated_embedding_obsm_key="pca",
        progress_bar=False,
        bio_conservation_metrics=BioConservation(isolated_labels=False),
        batch_correction_metrics=BatchCorrection(bras=False, kbet_per_label=False),
    )
    benchmarker.prepare(neighbor_computer=nearest_neighbors)
    benchmarker.benchmark()
    theirs = benchmarker.get_results(min_max_scale=False).drop("Metric Type")
    for embedding in ("scvi", "pca"):
        ours = report["scib"]["scores"][embedding]
        for name in (
            "iLISI",
            "cLISI",
            "Graph connectivity",
            "PCR comparison",
            "Silhouette label",
            "KMeans NMI",
            "KMeans ARI",
            "Bio conservation",
        ):
            value = ours.get(name, report["scib"]["aggregate"][embedding].get(name))
            assert value == pytest.approx(float(theirs.loc[embedding, name]), rel=1e-5, abs=1e-6), (embedding, name)

        points = latent if embedding == "scvi" else baseline
        types, batches = obs["cell_type"].to_numpy(), obs["batch"].to_numpy()
        per_type = [
            np.mean(1 - np.abs(silhouette_samples(points[types == t].astype(np.float64), batches[types == t])))
            for t in np.unique(types)
            if len(np.unique(batches[types == t])) > 1
        ]
        assert ours["Silhouette batch"] == pytest.approx(np.mean(per_type), abs=1e-4)


@needs_extra
def test_without_labels_only_the_label_free_metrics_are_computed(synthetic_run, synthetic_report, tmp_path):
    counts = synthetic_run["counts"]
    arguments = {key: value for key, value in synthetic_run.items() if key != "counts"}
    report = build_report(
        tmp_path,
        **{**arguments, "labels_key": None},
        max_cells=1200,
        seed=0,
        counts_for_baseline=lambda rows: log_normalize(counts[rows]),
    )
    assert_report_is_whole(report, tmp_path)
    for embedding in ("scvi", "pca"):
        assert set(report["scib"]["scores"][embedding]) == {"iLISI", "kBET", "PCR comparison"}
        assert set(report["scib"]["aggregate"][embedding]) == {"Batch correction"}
        # the same cells and neighbours as with labels: the same label-free numbers
        for name in ("iLISI", "PCR comparison"):
            labelled = synthetic_report[0]["scib"]["scores"][embedding][name]
            assert report["scib"]["scores"][embedding][name] == pytest.approx(labelled, rel=1e-6)
    assert report["scib"]["scores"]["scvi"]["kBET"] > report["scib"]["scores"]["pca"]["kBET"]
    assert report["scib"]["left_out"] == {}
    from matplotlib.image import imread

    assert imread(tmp_path / "umap.png").shape[1] == 2 * 540  # two panels of 5.4 in: batch and library size


@needs_extra
@pytest.mark.skipif(not (SHARED_DATA / "cellbench_3cl.h5ad").exists(), reason="../shared/data is absent")
def test_cellbench_report(tmp_path):
    import anndata

    from scvi_scale.data import write_store

    shutil.copy(SHARED_DATA / "cellbench_3cl.h5ad", tmp_path / "cellbench.h5ad")
    adata = anndata.read_h5ad(tmp_path / "cellbench.h5ad")
    # the 2,000 genes of highest total counts keep the test fast; the report does not choose genes
    genes = np.sort(np.argsort(np.asarray(adata.X.sum(axis=0)).ravel())[-2000:])
    write_store(adata[:, genes].copy(), tmp_path / "cellbench.zarr")
    run = train_and_describe(tmp_path / "cellbench.zarr", "batch", "cell_line", max_epochs=20, warmup=10)
    counts = run.pop("counts")
    # the array form: every cell's normalised counts, subsampled inside
    report = build_report(tmp_path / "report", **run, counts_for_baseline=log_normalize(counts))
    assert_report_is_whole(report, tmp_path / "report")
    assert report["cells"]["subsample"] == 499
    assert report["scib"]["n_batches"] == 2 and report["scib"]["n_labels"] == 3
    assert set(report["scib"]["aggregate"]["scvi"]) == {"Batch correction", "Bio conservation", "Total"}


@needs_extra
def test_train_command_writes_the_history_and_the_report_of_the_run(tmp_path):
    """`scvi-scale train --report`: history.csv and loss_curves.png beside the model, the report in report/, with
    the run's measurements and the store's outputs; `scvi-scale report` makes the same page from a saved model."""
    from scvi_scale.cli import main

    store = synthetic_atlas(tmp_path / "atlas.zarr", n_cells=600, n_genes=300, n_batches=2, seed=2).path
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(store),
                "--batch-key",
                "batch",
                "--labels-key",
                "cell_type",
                "--out",
                str(out),
                "--max-epochs",
                "3",
                "--report",
            ]
        )
        == 0
    )
    assert (out / "history.csv").exists() and (out / "loss_curves.png").stat().st_size > 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["run"]["train_cells_per_second"] > 0 and report["run"]["cells_in_data"] == 600
    assert len(report["history"]["train_loss"]) == 3
    assert main(["latent", str(store), "--model", str(out)]) == 0
    assert main(["report", str(store), "--model", str(out), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert {"obsm/X_scvi"} <= {output["entry"] for output in again["outputs"] if output["complete"]}
