"""The report's pictures: the UMAP of the latent (coordinates and panels) and the scIB scores side by side.

Figures are matplotlib `Figure`s drawn without pyplot (no global state, no display backend) and written as PNG.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from scvi_scale.data.writer import write_atomically
from scvi_scale.threads import torch_threads

UMAP_NEIGHBORS = 15  # umap-learn's default
MAX_LEGEND_ENTRIES = 30
DPI = 100


@torch_threads()  # numba's pool (pynndescent, umap-learn) would leave torch at every core
def umap_coordinates(embedding: np.ndarray, neighbors, seed: int) -> np.ndarray:
    """(n_cells, 2) UMAP of `embedding` (n_cells, n_dims) from its nearest neighbours (scib-metrics
    NeighborsResults, at least UMAP_NEIGHBORS columns, itself first), umap-learn's defaults otherwise. Seeded, so
    reproducible (umap-learn then lays out on one thread). The embedding itself places disconnected components."""
    import umap

    indices = neighbors.indices[:, :UMAP_NEIGHBORS]
    distances = neighbors.distances[:, :UMAP_NEIGHBORS]
    reducer = umap.UMAP(n_neighbors=UMAP_NEIGHBORS, random_state=seed, precomputed_knn=(indices, distances, None))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)  # the one thread above
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)  # no transform
        return reducer.fit_transform(embedding).astype(np.float32)


def _palette(n_colours: int) -> list:
    """Distinct colours for categories: matplotlib's tab10 / tab20, then evenly spaced hues."""
    from matplotlib import colormaps

    if n_colours <= 10:
        return [colormaps["tab10"](i) for i in range(n_colours)]
    if n_colours <= 20:
        return [colormaps["tab20"](i) for i in range(n_colours)]
    return [colormaps["hsv"](i / n_colours) for i in range(n_colours)]


def plot_umap(
    coordinates: np.ndarray, colourings: dict[str, pd.Series | np.ndarray], path: str | Path, seed: int
) -> Path:
    """One panel per colouring, side by side, in a PNG at `path`. colourings: title -> (n_cells,) values; a
    categorical Series is drawn with a colour per category (legend up to MAX_LEGEND_ENTRIES), numbers on a log
    colour scale with a colour bar. Cells are drawn in a seeded random order, so no group is painted over the rest."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    n_cells = len(coordinates)
    order = np.random.default_rng(seed).permutation(n_cells)
    point_size = float(np.clip(20_000 / n_cells, 0.3, 12))
    figure = Figure(figsize=(5.4 * len(colourings), 4.6), layout="constrained", dpi=DPI)
    axes = figure.subplots(1, len(colourings), squeeze=False)[0]
    for axis, (title, values) in zip(axes, colourings.items()):
        x, y = coordinates[order, 0], coordinates[order, 1]
        if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
            categories = values.cat.categories
            palette = np.array(_palette(len(categories)))
            codes = values.cat.codes.to_numpy()[order]
            colours = np.where(codes[:, None] >= 0, palette[np.maximum(codes, 0)], (0.6, 0.6, 0.6, 1.0))
            axis.scatter(x, y, c=colours, s=point_size, linewidths=0, rasterized=True)
            if len(categories) <= MAX_LEGEND_ENTRIES:
                for category, colour in zip(categories, palette):
                    axis.scatter([], [], color=colour, label=str(category), s=20)
                axis.legend(fontsize=7, markerscale=1.0, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
            else:
                title = f"{title} ({len(categories)} categories)"
        else:
            values = np.asarray(values, dtype=np.float64)[order]
            positive = values[values > 0]
            norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if len(positive) else None
            points = axis.scatter(
                x,
                y,
                c=np.where(values > 0, values, np.nan),
                s=point_size,
                linewidths=0,
                cmap="viridis",
                norm=norm,
                rasterized=True,
            )
            figure.colorbar(points, ax=axis, shrink=0.8)
        axis.set_title(title, fontsize=11)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_xlabel("UMAP 1", fontsize=8)
        axis.set_ylabel("UMAP 2", fontsize=8)
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))


def plot_scib_scores(scores: dict[str, dict[str, float]], groups: list[list[str]], path: str | Path) -> Path:
    """Horizontal bars, one row per metric, one bar per embedding, rows in `groups` (e.g. batch correction, bio
    conservation, aggregates) with a line between groups, in a PNG at `path`. scores: embedding title -> metric
    name -> value in [0, 1] (a metric an embedding lacks is left empty)."""
    from matplotlib.figure import Figure

    rows = [name for group in groups for name in group]
    height = 0.8 / len(scores)
    figure = Figure(figsize=(8.0, 0.9 + 0.42 * len(rows)), layout="constrained", dpi=DPI)
    axis = figure.subplots()
    for position, (embedding, values) in enumerate(scores.items()):
        row_values = [values.get(row, np.nan) for row in rows]
        offsets = np.arange(len(rows)) - 0.4 + height * (position + 0.5)
        bars = axis.barh(offsets, np.nan_to_num(row_values), height=height * 0.95, label=embedding)
        axis.bar_label(bars, labels=[f"{value:.3f}" for value in row_values], fontsize=7, padding=2)
    for boundary in np.cumsum([len(group) for group in groups])[:-1]:
        axis.axhline(boundary - 0.5, color="black", linewidth=0.8)
    axis.set_yticks(np.arange(len(rows)), rows, fontsize=9)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.12)
    axis.set_xlabel("score (higher is better)")
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
