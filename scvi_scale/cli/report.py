"""`scvi-scale report STORE --model MODEL_DIR [--labels-key K] [--out report/]`: the integration report of a
trained model over a store (scvi_scale.report; needs `pip install 'scvi-scale[report]'`)."""

from __future__ import annotations

import json
from pathlib import Path

from scvi_scale import SCVI
from scvi_scale.cli.defaults import default


def add_commands(commands) -> None:
    p = commands.add_parser("report", help="HTML report: loss curves, UMAP and scIB metrics of the latent")
    p.add_argument("store", help="the AnnData-Zarr store the model was trained on (or one with the same genes)")
    p.add_argument("--model", required=True, help="model directory written by `scvi-scale train` / model.save")
    p.add_argument("--labels-key", help="obs column of cell labels (default: the registered one, if any)")
    p.add_argument("--out", default="report", help="folder for report.html, its PNGs and report.json")
    p.add_argument(
        "--max-cells",
        type=int,
        default=default(SCVI.report, "max_cells"),
        help="cells of the seeded subsample the UMAP and the metrics use",
    )
    p.add_argument("--seed", type=int, help="seed of the subsample (default settings.seed)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.set_defaults(run=run_report)


def run_report(args) -> int:
    model = SCVI.load(args.model, args.store)
    report = model.report(
        Path(args.out), labels_key=args.labels_key, max_cells=args.max_cells, seed=args.seed, overwrite=args.overwrite
    )
    print(
        json.dumps(
            {
                "report": str(Path(args.out) / "report.html"),
                "cells": report["cells"],
                "scib_aggregate": report["scib"]["aggregate"],
            },
            indent=2,
        )
    )
    return 0
