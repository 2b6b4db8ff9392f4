"""Report benchmark: the seconds of each stage of build_report and the peak RSS, by subsample size.

    .venv/bin/python benchmarks/report.py                                   # 20k, 50k and 200k cells
    .venv/bin/python benchmarks/report.py --sizes 20000 --epochs 1 --data-dir /tmp/atlases

Stores are the loader benchmark's synthetic atlases (benchmarks/loader.py ensure_store: 2000 genes, 16 batches,
8 cell types, CSR), made once in --data-dir. For each size, a child process trains SCVI for --epochs epochs (the
latent only has to be a latent: the cost of the report does not depend on how well it fits), then builds the
report of every cell (max_cells = the size), reading the subsample's counts from the store block by block.
Stages (report.json "seconds"): imports (jax, scib-metrics, umap-learn), subsample (reading and normalising the
counts), pca_baseline, neighbors (both embeddings), umap, scib_metrics (both embeddings), figures; peak RSS is
the child's ru_maxrss, training included. Needs the extra: pip install 'scvi-scale[report]'.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import ensure_store  # noqa: E402  (the loader benchmark's stores)

STAGES = ("imports", "subsample", "pca_baseline", "neighbors", "umap", "scib_metrics", "figures")


def one_case(store_path: Path, epochs: int, out_dir: Path) -> dict:
    """Train, build the report into out_dir, and return its stage seconds and the peak RSS."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from scvi_scale import SCVI
    from scvi_scale.report import build_report, log_normalize

    SCVI.setup_zarr(store_path, batch_key="batch", labels_key="cell_type")
    model = SCVI(store_path)
    model.train(max_epochs=epochs)
    store = model.store
    bounds = store.block_bounds()

    def log_counts(rows: np.ndarray):
        """The rows' counts, read a store block at a time (only blocks holding a subsampled row), normalised."""
        parts = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            inside = rows[(rows >= start) & (rows < stop)]
            if len(inside):
                parts.append(store.read_csr(int(start), int(stop))[inside - start])
        return log_normalize(sp.vstack(parts, format="csr"))

    library_size = np.concatenate(
        [np.asarray(store.read_csr(int(a), int(b)).sum(axis=1)).ravel() for a, b in zip(bounds[:-1], bounds[1:])]
    )
    obs = pd.DataFrame(
        {
            "batch": store.obs_column("batch").to_numpy(),
            "cell_type": store.obs_column("cell_type").to_numpy(),
            "library_size": library_size,
        }
    )
    report = build_report(
        out_dir,
        latent=model.get_latent_representation(),
        obs=obs,
        batch_key="batch",
        labels_key="cell_type",
        history=model.history_,
        run={},
        outputs=[],
        counts_for_baseline=log_counts,
        max_cells=store.n_obs,
        seed=0,
    )
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": report["seconds"],
        "peak_rss_bytes": peak_rss,
        "neighbor_search": report["scib"]["neighbor_search"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 200_000])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path("benchmark_data"))
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # a child: the store of one case
    args = parser.parse_args()
    if args.one is not None:
        with tempfile.TemporaryDirectory() as out_dir:
            print(json.dumps(one_case(args.one, args.epochs, Path(out_dir))))
        return

    args.data_dir.mkdir(parents=True, exist_ok=True)
    print(f"{'cells':>8} " + " ".join(f"{stage:>12}" for stage in STAGES) + f" {'total s':>8} {'peak MiB':>9}  kNN")
    for n_cells in args.sizes:
        store_path = ensure_store(args.data_dir, n_cells)
        command = [sys.executable, __file__, "--one", str(store_path), "--epochs", str(args.epochs)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        seconds = result["seconds"]
        print(
            f"{n_cells:>8} "
            + " ".join(f"{seconds[stage]:>12.1f}" for stage in STAGES)
            + f" {sum(seconds.values()):>8.1f} {result['peak_rss_bytes'] / 2**20:>9.0f}  {result['neighbor_search']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
