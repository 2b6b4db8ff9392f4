"""build_report: the report of one trained model, in one directory.

    out_dir/report.html   the page (self-contained: images inline, no script, no network at view time)
    out_dir/report.json   every number on the page
    out_dir/history.png, umap.png, scib.png, history.csv

Work is bounded on an atlas: the UMAP and the scIB metrics run on one seeded subsample of at most `max_cells`
cells (`subsample_rows`), and only those cells' counts are asked for. The slowest parts are the silhouettes
(quadratic in the subsample) and the UMAP layout (benchmarks/history/from-code.md).
The files are written one by one, each atomically; report.html is removed first and written last, so its
presence means the report is whole.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.data.writer import write_atomically
from scvi_scale.report.extra import require_extra
from scvi_scale.report.figures import UMAP_NEIGHBORS, plot_scib_scores, plot_umap, umap_coordinates
from scvi_scale.report.history import (
    check_history,
    elapsed_seconds,
    history_frame,
    plot_loss_curves,
    write_history_table,
)
from scvi_scale.report.html import render_page
from scvi_scale.report.metrics import (
    AGGREGATES,
    BATCH_CORRECTION,
    BIO_CONSERVATION,
    EMBEDDING_TITLES,
    LEFT_OUT,
    N_NEIGHBORS,
    aggregate_scores,
    category_codes,
    nearest_neighbors,
    neighbor_search,
    pca_baseline,
    scib_scores,
    subsample_rows,
)

LIBRARY_SIZE = "library_size"
REPORT_FORMAT = "scvi-scale report 1"


def _check_inputs(latent, obs, batch_key, labels_key, history, counts_for_baseline, max_cells) -> None:
    """Every check that needs no computation, so that bad input fails before minutes of work."""
    if min(len(obs), max_cells) <= N_NEIGHBORS:
        raise ValueError(
            f"the report needs more than {N_NEIGHBORS} cells (its neighbourhoods), not {min(len(obs), max_cells)}"
        )
    if latent.ndim != 2:
        raise ValueError(f"latent has shape {latent.shape}: expected (n_cells, n_latent)")
    if latent.shape[0] != len(obs):
        raise ValueError(f"latent has {latent.shape[0]} rows but obs has {len(obs)}: they must be the same cells")
    for role, key in (("batch_key", batch_key), ("labels_key", labels_key), ("library size", LIBRARY_SIZE)):
        if key is not None and key not in obs.columns:
            raise ValueError(f"obs has no column {key!r} ({role}); its columns are {list(obs.columns)}")
    bad = ~np.isfinite(latent).all(axis=1)
    if bad.any():
        raise ValueError(
            f"the latent is not finite in {int(bad.sum())} cells, first rows {np.flatnonzero(bad)[:5].tolist()}"
        )
    check_history(history)
    if not callable(counts_for_baseline) and counts_for_baseline.shape[0] != len(obs):
        raise ValueError(
            f"counts_for_baseline has {counts_for_baseline.shape[0]} rows but there are {len(obs)} "
            "cells: give all cells' rows (they are subsampled here) or a callable of the rows"
        )


def _json_ready(value):
    """`value` with numpy scalars and arrays as Python numbers and lists, tuples as lists, NaN and inf as None."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_ready(item) for item in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


REPORT_FILES = ("report.html", "report.json")


def check_report_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """Raise FileExistsError when `out_dir` holds a report (and overwrite is False): one is never replaced unasked."""
    existing = [Path(out_dir) / name for name in REPORT_FILES if (Path(out_dir) / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists; pass overwrite (--overwrite) to replace the report, or choose another folder"
        )


def build_report(
    out_dir: str | Path,
    *,
    latent: np.ndarray,
    obs: pd.DataFrame,
    batch_key: str | None,
    labels_key: str | None,
    history: dict[str, list[tuple[int, float]]],
    run: dict,
    outputs: list[dict],
    counts_for_baseline: Callable[[np.ndarray], np.ndarray | sp.csr_matrix] | np.ndarray | sp.csr_matrix,
    max_cells: int = 200_000,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write the report of a trained model into `out_dir` (created if need be) and return its JSON.

    latent: (n_cells, n_latent) the model's latent representation of every cell.
    obs: n_cells rows in the latent's order, with the columns `batch_key` and `labels_key` (when not None) and
        "library_size" (total counts per cell).
    history: metric -> [(epoch, value)] as the training loop records it (see history.py).
    run: measurements of the training run shown as they are, e.g. {"cells_per_second": .., "peak_rss_bytes": ..,
        "device": .., "threads": .., "seconds": ..}; a key ending in "bytes" is also shown in KiB/MiB/GiB.
    outputs: what was written into the store, [{"entry", "kind", "shape", "bytes", "complete"}].
    counts_for_baseline: log1p-normalised counts for the PCA baseline (see metrics.log_normalize): a callable
        taking the sorted int64 rows of the subsample and returning their (n_rows, n_genes) matrix (dense or
        sparse), or the (n_cells, n_genes) matrix of all cells.
    max_cells, seed: the subsample for the UMAP and the metrics (`subsample_rows`).
    overwrite: replace a report already in `out_dir` (else FileExistsError).

    Raises ImportError naming `pip install 'scvi-scale[report]'` when the extra is missing, and ValueError on
    inconsistent input, both before any work.
    """
    require_extra()
    check_report_dir(out_dir, overwrite)
    latent = np.asarray(latent)
    _check_inputs(latent, obs, batch_key, labels_key, history, counts_for_baseline, max_cells)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.html").unlink(missing_ok=True)  # an earlier report's page must not outlive a failed run
    clock = _StageClock()
    import scib_metrics  # noqa: F401  (jax: ~3 s, timed apart from the work)
    import umap  # noqa: F401

    clock.lap("imports")
    rows = subsample_rows(len(obs), max_cells, seed)
    sub_obs = obs.iloc[rows]
    batches = category_codes(sub_obs[batch_key]) if batch_key is not None else None
    labels = category_codes(sub_obs[labels_key]) if labels_key is not None else None
    coordinates, baseline, scores, aggregates = _analyse(
        latent, rows, counts_for_baseline, batches, labels, seed, clock
    )
    colourings = {f"{kind} ({key})": sub_obs[key] for kind, key in (("batch", batch_key), ("label", labels_key)) if key}
    images = _figures(
        out_dir, history, coordinates, colourings, sub_obs[LIBRARY_SIZE].to_numpy(), scores, aggregates, seed
    )
    write_history_table(history, out_dir)
    clock.lap("figures")

    report = {
        "format": REPORT_FORMAT,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cells": {"n_cells": len(obs), "subsample": len(rows), "max_cells": max_cells, "seed": seed},
        "keys": {"batch_key": batch_key, "labels_key": labels_key},
        "history": {key: [[int(epoch), float(value)] for epoch, value in pairs] for key, pairs in history.items()},
        "history_summary": _history_summary(history),
        "run": run,
        "outputs": outputs,
        "umap": {"n_neighbors": UMAP_NEIGHBORS, "seed": seed, "umap_learn_version": version("umap-learn")},
        "scib": _scib_section(scores, aggregates, batches, labels, len(rows), baseline.shape[1]),
        "images": {name: path.name for name, path in images.items()},
        "seconds": clock.seconds,
    }
    report = _json_ready(report)
    write_atomically(out_dir / "report.json", lambda path: path.write_text(json.dumps(report, indent=1)))
    page = render_page(report, images)
    write_atomically(out_dir / "report.html", lambda path: path.write_text(page, encoding="utf-8"))
    return report


@dataclass
class _StageClock:
    """Seconds per stage of the report's work: lap(stage) ends the stage begun at the last lap (or at creation)."""

    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self.started
        self.started = now


def _analyse(latent: np.ndarray, rows: np.ndarray, counts_for_baseline, batches, labels, seed: int, clock):
    """The analysis of the subsample `rows` (batches, labels: their codes, or None): (UMAP coordinates of its
    latent, its PCA baseline, scIB scores and aggregates of both embeddings), each stage timed on `clock`."""
    embedding = latent[rows].astype(np.float32)
    log_counts = counts_for_baseline(rows) if callable(counts_for_baseline) else counts_for_baseline[rows]
    if log_counts.shape[0] != len(rows):
        raise ValueError(f"counts_for_baseline gave {log_counts.shape[0]} rows for {len(rows)} subsampled cells")
    clock.lap("subsample")
    baseline = pca_baseline(log_counts, latent.shape[1], seed)
    embeddings = {"scvi": embedding, "pca": baseline}
    clock.lap("pca_baseline")
    neighbors = {name: nearest_neighbors(points, seed=seed) for name, points in embeddings.items()}
    clock.lap("neighbors")
    coordinates = umap_coordinates(embedding, neighbors["scvi"], seed)
    clock.lap("umap")
    scores = {
        name: scib_scores(points, neighbors[name], baseline, batches, labels) for name, points in embeddings.items()
    }
    aggregates = {name: aggregate_scores(values) for name, values in scores.items()}
    clock.lap("scib_metrics")
    return coordinates, baseline, scores, aggregates


def _figures(out_dir: Path, history, coordinates, colourings: dict, library_sizes, scores, aggregates, seed) -> dict:
    """The report's PNGs in out_dir: the loss curves, the UMAP coloured by each of `colourings` (obs columns, as
    categories) and by library size, and the scIB scores when any were computed. Returns {name: path}."""
    images = {"history": plot_loss_curves(history, out_dir / "history.png")}
    umap_colours = {title: values.astype("category").reset_index(drop=True) for title, values in colourings.items()}
    umap_colours["library size (total counts)"] = library_sizes
    images["umap"] = plot_umap(coordinates, umap_colours, out_dir / "umap.png", seed)
    if any(scores.values()):
        bars = {EMBEDDING_TITLES[name]: {**scores[name], **aggregates[name]} for name in scores}
        groups = [
            [name for name in group if name in bars[EMBEDDING_TITLES["scvi"]]]
            for group in (BATCH_CORRECTION, BIO_CONSERVATION, AGGREGATES)
        ]
        images["scib"] = plot_scib_scores(bars, [group for group in groups if group], out_dir / "scib.png")
    return images


def _history_summary(history: dict[str, list[tuple[int, float]]]) -> dict:
    """Epochs trained, the training's seconds (None when not recorded) and each metric's last value."""
    frame = history_frame(history)
    elapsed = elapsed_seconds(history)
    return {
        "epochs": len(frame),
        "training_seconds": max(elapsed.values()) if elapsed else None,
        "final": {key: frame[key].dropna().iloc[-1] for key in frame.columns if frame[key].notna().any()},
    }


def _scib_section(scores: dict, aggregates: dict, batches, labels, n_rows: int, n_components: int) -> dict:
    """report.json's "scib": the scores and aggregates of each embedding and how they were computed."""
    return {
        "scib_metrics_version": version("scib-metrics"),
        "n_neighbors": N_NEIGHBORS,
        "neighbor_search": neighbor_search(n_rows),
        "n_batches": int(len(np.unique(batches))) if batches is not None else None,
        "n_labels": int(len(np.unique(labels))) if labels is not None else None,
        "baseline": f"Baseline: PCA ({n_components} components, as many as the latent's dimensions) of the "
        "log1p-normalised counts of the same cells, uncorrected for batch; it is also PCR "
        "comparison's pre-integration embedding, so its own PCR comparison is 0.",
        "scores": scores,
        "aggregate": aggregates,
        "categories": {"Batch correction": list(BATCH_CORRECTION), "Bio conservation": list(BIO_CONSERVATION)},
        "aggregate_rule": "Aggregates as scib-metrics' Benchmarker (min_max_scale=False): the mean of each "
        "category's computed scores; Total = 0.4 batch correction + 0.6 bio conservation.",
        "left_out": LEFT_OUT if labels is not None else {},
        "why_none": None if any(scores.values()) else "it needs two batches or two labels in the subsample",
    }
