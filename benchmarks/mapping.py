"""Reference mapping with another gene panel: k-NN label-transfer accuracy, scvi-scale and scvi-tools, same run.

    .venv/bin/python benchmarks/mapping.py [--peer-python /work/peer/bin/python] [--seeds 0 1 2]
                                           [--reference-epochs 100] [--query-epochs 50] [--removed 0.3]

An accuracy measure, not a timing. Data: ../shared/data/cellbench_3cl.h5ad (3 cell lines on 2 platforms). The
reference is the CEL-seq2 cells on their N_GENES most variable genes (picked on the reference alone); the query is
the Drop-seq cells from another panel: a share (--removed) of the reference's genes absent, N_OWN_GENES genes of
its own, the order shuffled. Each side runs scvi-tools' scArches tutorial as written (its model settings, the
query trained with weight_decay 0): setup_anndata, SCVI, train, prepare_query_anndata in place,
load_query_data, train; then the query model's latent of anndata.concat([reference, query]) (the joint latent),
and each query cell gets the majority cell line of its K nearest reference cells there. The scvi-tools side runs
this same file under --peer-python (a Python with scvi-tools; scvi-scale is not imported there), per seed, with
the same query, epochs and settings, one torch thread on both sides. Prints one row per seed and side, and the
mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

CELLBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cellbench_3cl.h5ad"
N_GENES = 2000
N_OWN_GENES = 100
K = 15
MODEL_SETTINGS = dict(
    n_layers=2, encode_covariates=True, deeply_inject_covariates=False, use_layer_norm="both", use_batch_norm="none"
)  # scvi-tools' scArches tutorial


def reference_and_query(removed: float, seed: int = 0) -> tuple[anndata.AnnData, anndata.AnnData, int]:
    """(reference AnnData, query AnnData with another panel, number of reference genes the query lacks)."""
    data = anndata.read_h5ad(CELLBENCH)
    reference = data[data.obs["batch"] == "celseq2"].copy()
    counts = reference.X.toarray()
    normalized = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    order = np.argsort(normalized.var(0))[::-1]
    panel, others = reference.var_names[order[:N_GENES]], reference.var_names[order[N_GENES:]]
    rng = np.random.default_rng(seed)
    n_missing = int(round(removed * N_GENES))
    query_genes = list(rng.permutation(panel)[n_missing:]) + list(rng.choice(others, N_OWN_GENES, replace=False))
    query_genes = list(rng.permutation(query_genes))
    query = data[data.obs["batch"] == "dropseq"][:, query_genes].copy()
    return reference[:, panel].copy(), query, n_missing


def transfer_accuracy(joint_latent: np.ndarray, reference_labels: np.ndarray, query_labels: np.ndarray) -> float:
    """Share of query cells whose K nearest reference cells (Euclidean, joint latent) vote their true label."""
    n_reference = len(reference_labels)
    reference, query = joint_latent[:n_reference], joint_latent[n_reference:]
    distances = ((query[:, None, :] - reference[None, :, :]) ** 2).sum(-1)
    neighbours = np.argsort(distances, axis=1)[:, :K]
    votes = [pd.Series(reference_labels[row]).mode()[0] for row in neighbours]
    return float(np.mean(np.asarray(votes) == query_labels))


def run_side(side: str, seed: int, reference_epochs: int, query_epochs: int, removed: float) -> dict:
    """The scArches tutorial with `side`'s SCVI; returns the accuracy and what it took."""
    import torch

    torch.set_num_threads(1)
    if side == "scvi-tools":
        import scvi

        scvi.settings.seed = seed
        SCVI, train_seed = scvi.model.SCVI, {}
    else:
        from scvi_scale import SCVI
        from scvi_scale.settings import settings

        settings.seed = seed
        train_seed = {"seed": seed}
    reference, query, n_missing = reference_and_query(removed)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SCVI.setup_anndata(reference, batch_key="batch")
        vae_ref = SCVI(reference, **MODEL_SETTINGS)
        vae_ref.train(max_epochs=reference_epochs, accelerator="cpu", enable_progress_bar=False, **train_seed)
        SCVI.prepare_query_anndata(query, vae_ref)
        vae_q = SCVI.load_query_data(query, vae_ref)
        vae_q.train(
            max_epochs=query_epochs,
            plan_kwargs={"weight_decay": 0.0},
            accelerator="cpu",
            enable_progress_bar=False,
            **train_seed,
        )
        joint = anndata.concat([reference, query])
        joint_latent = vae_q.get_latent_representation(joint)
    panel_warnings = [str(w.message) for w in caught if "reference var names" in str(w.message)]
    return {
        "side": side,
        "seed": seed,
        "n_missing": n_missing,
        "query_shape": list(query.shape),
        "accuracy": transfer_accuracy(
            joint_latent, reference.obs["cell_line"].to_numpy(), query.obs["cell_line"].to_numpy()
        ),
        "seconds": time.perf_counter() - started,
        "panel_warning": panel_warnings[0] if panel_warnings else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", default="/work/peer/bin/python", help="a Python with scvi-tools")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reference-epochs", type=int, default=100)
    parser.add_argument("--query-epochs", type=int, default=50)
    parser.add_argument("--removed", type=float, default=0.3, help="share of the reference genes the query lacks")
    parser.add_argument("--side", choices=["scvi-scale", "scvi-tools"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not CELLBENCH.exists():
        sys.exit(f"{CELLBENCH} is absent")
    settings = (args.reference_epochs, args.query_epochs, args.removed)
    if args.side:  # one side, one seed, for the parent process
        print(json.dumps(run_side(args.side, args.seeds[0], *settings)))
        return
    rows = []
    for seed in args.seeds:
        for side, python in (("scvi-scale", sys.executable), ("scvi-tools", args.peer_python)):
            command = [
                python,
                __file__,
                "--side",
                side,
                "--seeds",
                str(seed),
                "--reference-epochs",
                str(args.reference_epochs),
                "--query-epochs",
                str(args.query_epochs),
                "--removed",
                str(args.removed),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"seed {seed}  {side:10s}  accuracy {row['accuracy']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    first = rows[0]
    print(
        f"\nreference celseq2 {N_GENES} genes; query dropseq {first['query_shape']} lacking {first['n_missing']} "
        f"reference genes, {N_OWN_GENES} of its own; epochs {args.reference_epochs} + {args.query_epochs}, "
        f"k = {K}"
    )
    print("| side | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | spread (max - min) |")
    print("| --- |" + " --- |" * (len(args.seeds) + 2))
    for side in ("scvi-scale", "scvi-tools"):
        values = [row["accuracy"] for row in rows if row["side"] == side]
        print(
            f"| {side} | "
            + " | ".join(f"{v:.3f}" for v in values)
            + f" | {np.mean(values):.3f} | {max(values) - min(values):.3f} |"
        )
    for side in ("scvi-scale", "scvi-tools"):
        warning = next(row["panel_warning"] for row in rows if row["side"] == side)
        print(f"{side} warned: {warning or '(nothing)'}")


if __name__ == "__main__":
    main()
