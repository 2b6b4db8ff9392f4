"""`scvi-scale map QUERY --reference MODEL_DIR --out MODEL_DIR`: map a query store onto a trained reference
(scArches), fine-tune, save, write the query latent and, with --labels-key, transfer the reference's labels."""

from __future__ import annotations

import argparse
from pathlib import Path

from scvi_scale import SCVI, persist
from scvi_scale.cli.defaults import default
from scvi_scale.model.training import CHECKPOINT_FILE
from scvi_scale.outputs import write_obsm
from scvi_scale.outputs.labels import transfer_labels
from scvi_scale.train import TrainingConfig

FREEZE_OPTIONS = (
    "freeze_dropout",
    "freeze_expression",
    "freeze_decoder_first_layer",
    "freeze_batchnorm_encoder",
    "freeze_batchnorm_decoder",
)


def add_commands(subparsers) -> None:
    """`scvi-scale map QUERY_STORE --reference MODEL_DIR --out MODEL_DIR`: map, fine-tune, save, transfer labels."""
    p = subparsers.add_parser("map", help="map a query store onto a trained reference (scArches) and save the model")
    p.add_argument(
        "query",
        help="AnnData-Zarr store of the query cells; another gene panel maps as it is "
        "(missing reference genes read as zeros, a warning says how many; the store is "
        "not rewritten)",
    )
    p.add_argument("--reference", required=True, help="reference model directory (scvi-scale train)")
    p.add_argument("--out", required=True, help="directory for the query model")
    p.add_argument("--reference-store", help="the reference's store: needed for --labels-key")
    p.add_argument("--labels-key", help="reference obs column to transfer to the query by k-NN on the latent")
    p.add_argument("--k", type=int, default=default(transfer_labels, "k"), help="neighbours for label transfer")
    p.add_argument("--max-epochs", type=int, help="fine-tuning epochs (default: scvi-tools' heuristic)")
    p.add_argument("--batch-size", type=int, default=default(SCVI.train, "batch_size"))
    p.add_argument("--lr", type=float, default=TrainingConfig.lr)
    p.add_argument("--weight-decay", type=float, default=0.0, help="as scvi-tools' tutorials use for queries")
    p.add_argument("--accelerator", default=default(SCVI.train, "accelerator"))
    p.add_argument("--seed", type=int, default=default(SCVI.train, "seed"))
    p.add_argument("--unfrozen", action="store_true", help="train every weight")
    for option in FREEZE_OPTIONS:
        p.add_argument(
            f"--{option.replace('_', '-')}",
            action=argparse.BooleanOptionalAction,
            default=default(SCVI.load_query_data, option),
        )
    p.add_argument("--latent-key", default="X_scVI", help="obsm key for the query latent")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model, latent or prediction")
    p.set_defaults(run=_run_map)


def _run_map(args) -> int:
    out = Path(args.out)
    if persist.model_path(out).exists() and not args.overwrite:
        raise FileExistsError(
            f"{persist.model_path(out)} exists: pass --overwrite to replace it or choose another --out"
        )
    if args.labels_key and not args.reference_store:
        raise ValueError("--labels-key needs --reference-store (the reference cells' latent and labels)")
    query_store = SCVI.prepare_query_zarr(args.query, args.reference)
    model = SCVI.load_query_data(
        query_store,
        args.reference,
        unfrozen=args.unfrozen,
        **{option: getattr(args, option) for option in FREEZE_OPTIONS},
    )
    # --out at a URL: trained in its staging folder, then uploaded with model.pt last (the checkpoint stays local)
    with persist.model_folder(args.out, overwrite=args.overwrite, keep=(CHECKPOINT_FILE,)) as folder:
        model.train(
            max_epochs=args.max_epochs,
            accelerator=args.accelerator,
            batch_size=args.batch_size,
            plan_kwargs={"lr": args.lr, "weight_decay": args.weight_decay},
            checkpoint_dir=folder,
            seed=args.seed,
        )
        model.save(folder, overwrite=True)
    latent = model.get_latent_representation()
    write_obsm(args.query, args.latent_key, latent, overwrite=args.overwrite)
    print(f"query model saved to {args.out}; latent written to {args.query} obsm/{args.latent_key}")
    if args.labels_key:
        reference = SCVI.load(args.reference, args.reference_store)
        result = transfer_labels(
            reference, model, labels_key=args.labels_key, k=args.k, overwrite=args.overwrite, query_latent=latent
        )
        print(f"wrote obs columns {list(result.columns)} to {args.query}")
    return 0
