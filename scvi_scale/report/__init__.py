"""The report of a training run: loss curves, throughput and memory, a UMAP of the latent, scIB integration
metrics beside an uncorrected PCA baseline, and what was written into the store, as one self-contained HTML page.

    build_report(out_dir, latent=..., obs=..., ...)   the page, its PNGs and report.json (needs the extra)
    write_history_table(history, directory)          history.csv (core install)
    plot_loss_curves(history, path)                  the loss-curve PNG (matplotlib)
    missing_extra()                                  None, or which packages of `scvi-scale[report]` are missing

Files: extra (dependency check), history, metrics (scIB), figures, html, build.
Nothing heavy is imported here: matplotlib, umap-learn and scib-metrics (jax) load when a function needs them.
"""

from scvi_scale.report.build import build_report, check_report_dir
from scvi_scale.report.extra import missing_extra, require_extra
from scvi_scale.report.history import plot_loss_curves, write_history_table
from scvi_scale.report.metrics import log_normalize, subsample_rows

__all__ = [
    "build_report",
    "check_report_dir",
    "log_normalize",
    "missing_extra",
    "plot_loss_curves",
    "require_extra",
    "subsample_rows",
    "write_history_table",
]
