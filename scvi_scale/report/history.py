"""The training history as a table (CSV) and as loss curves (PNG), against epochs and against wall time.

A history is what the training loop records: metric name -> [(epoch, value), ...], epochs counted from 0, one
pair per epoch the metric was computed in (validation metrics may skip epochs). `epoch_seconds` holds the wall
time of each epoch, validation included; its running sum places every epoch on a wall-time axis.

Metrics are drawn by family, a family being the name without its `_train` / `_validation` suffix, so that
`elbo_train` and `elbo_validation` share a panel. Whatever the loop records is drawn, in FAMILY_TITLES' order
first, then alphabetically.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from scvi_scale.data.writer import write_atomically
from scvi_scale.report.extra import require_extra

History = dict[str, list[tuple[int, float]]]

HISTORY_TABLE = "history.csv"
LOSS_CURVES = "loss_curves.png"  # the train command's loss-curve PNG, beside the model
WALL_TIME_KEY = "epoch_seconds"
FAMILY_TITLES = {
    "elbo": "ELBO (negative, per cell)",
    "reconstruction_loss": "Reconstruction loss (per cell)",
    "kl_local": "KL divergence, local (per cell)",
    "kl_global": "KL divergence, global",
    "train_loss": "Training loss (the optimised objective)",
    "train_loss_epoch": "Training loss (the optimised objective)",
    "kl_weight": "KL weight",
    "lr": "Learning rate",
}
LOSS_FAMILIES = ("elbo", "reconstruction_loss", "kl_local", "kl_global", "train_loss", "train_loss_epoch")


def check_history(history: History) -> None:
    """Raise ValueError naming the metric and position of the first entry that is not an (epoch, value) pair."""
    if not history or not any(history.values()):
        raise ValueError("the training history is empty: nothing was trained")
    for key, pairs in history.items():
        for position, pair in enumerate(pairs):
            if len(pair) != 2 or int(pair[0]) != pair[0] or pair[0] < 0:
                raise ValueError(f"history[{key!r}][{position}] is {pair!r}: expected an (epoch, value) pair")


def history_frame(history: History) -> pd.DataFrame:
    """One row per epoch (index `epoch`), one column per metric in the history's order; NaN where a metric was
    not computed in that epoch."""
    check_history(history)
    columns = {
        key: pd.Series({int(epoch): float(value) for epoch, value in pairs}, dtype=float)
        for key, pairs in history.items()
    }
    frame = pd.DataFrame(columns)
    frame.index.name = "epoch"
    return frame.sort_index()


def write_history_table(history: History, directory: str | Path) -> Path:
    """Write `directory/history.csv` (columns: epoch, then every metric) and return its path. Needs no extra."""
    frame = history_frame(history)
    return write_atomically(Path(directory) / HISTORY_TABLE, lambda path: frame.to_csv(path, float_format="%.9g"))


def elapsed_seconds(history: History) -> dict[int, float] | None:
    """Wall seconds from the start of training to the end of each epoch (the running sum of `epoch_seconds`), or
    None when the history has no epoch times."""
    pairs = sorted(history.get(WALL_TIME_KEY, []))
    if not pairs:
        return None
    elapsed, total = {}, 0.0
    for epoch, seconds in pairs:
        total += seconds
        elapsed[int(epoch)] = total
    return elapsed


def metric_families(history: History) -> list[tuple[str, list[str]]]:
    """[(family, [metric names])] for every metric but the epoch times, known families first."""
    families: dict[str, list[str]] = {}
    for key, pairs in history.items():
        if key != WALL_TIME_KEY and pairs:
            family = key.removesuffix("_train").removesuffix("_validation")
            families.setdefault(family, []).append(key)
    known = [family for family in FAMILY_TITLES if family in families]
    return [(family, families[family]) for family in known + sorted(set(families) - set(known))]


def _time_axis(longest_seconds: float) -> tuple[str, float]:
    """The unit to show a wall-time axis in and the seconds per unit."""
    if longest_seconds >= 2 * 3600:
        return "hours", 3600.0
    if longest_seconds >= 2 * 60:
        return "minutes", 60.0
    return "seconds", 1.0


def plot_loss_curves(history: History, path: str | Path) -> Path:
    """Draw every metric family of `history` in one PNG at `path`: a row per family, against epochs on the left
    and against wall time on the right (when the history has epoch times). Needs matplotlib."""
    require_extra("matplotlib")
    from matplotlib.figure import Figure

    check_history(history)
    families = metric_families(history)
    elapsed = elapsed_seconds(history)
    n_columns = 2 if elapsed else 1
    figure = Figure(figsize=(5.6 * n_columns, 0.6 + 2.3 * len(families)), layout="constrained", dpi=100)
    axes = figure.subplots(len(families), n_columns, squeeze=False)
    unit, seconds_per_unit = _time_axis(max(elapsed.values())) if elapsed else ("", 1.0)
    for row, (family, keys) in enumerate(families):
        values_seen = []
        for key in keys:
            epochs = [int(epoch) for epoch, _ in history[key]]
            values = [float(value) for _, value in history[key]]
            values_seen += [value for value in values if math.isfinite(value)]
            style = {"label": key, "marker": "o" if len(epochs) <= 30 else None, "markersize": 3, "linewidth": 1.3}
            axes[row, 0].plot(epochs, values, **style)
            if elapsed:
                times = [elapsed.get(epoch, math.nan) / seconds_per_unit for epoch in epochs]
                axes[row, 1].plot(times, values, **style)
        # losses fall by orders of magnitude in the first epochs: a log axis keeps the late epochs readable
        logarithmic = family in LOSS_FAMILIES and values_seen and min(values_seen) > 0
        logarithmic = logarithmic and max(values_seen) > 10 * min(values_seen)
        for column in range(n_columns):
            axis = axes[row, column]
            axis.set_title(FAMILY_TITLES.get(family, family), fontsize=10)
            axis.grid(alpha=0.3)
            if logarithmic:
                axis.set_yscale("log")
            if column == 0:
                axis.legend(fontsize=8)
    axes[-1, 0].set_xlabel("epoch")
    if elapsed:
        axes[-1, 1].set_xlabel(f"wall time since the start of training ({unit})")
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
