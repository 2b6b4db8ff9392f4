"""The `scvi-scale` command line: atlas-scale jobs over Zarr stores.

    scvi-scale convert SOURCE STORE            # .h5ad, 10x folder or AnnData-Zarr -> our streaming layout
    scvi-scale train STORE --batch-key batch --out MODEL_DIR [--max-epochs N] [--resume] [--nproc N]
    torchrun --nnodes M --nproc-per-node N ... -m scvi_scale.cli train ...   # data-parallel across machines
    scvi-scale latent | normalize | de | sample STORE --model MODEL_DIR   # outputs written into the store
    scvi-scale map QUERY --reference MODEL_DIR --out MODEL_DIR [--reference-store STORE --labels-key cell_type]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from scvi_scale.mapping import add_map_command
from scvi_scale.outputs.cli import add_commands as add_output_commands


def _add_train(commands) -> None:
    p = commands.add_parser("train", help="train scVI on a store and save the model")
    p.add_argument("store", help="AnnData-Zarr store (see `scvi-scale convert`)")
    p.add_argument("--out", required=True, help="model directory; the training checkpoint lives there too")
    p.add_argument("--layer", help="layer holding raw counts (default X)")
    p.add_argument("--batch-key", help="obs column of the batch (e.g. sample or platform)")
    p.add_argument("--labels-key", help="obs column of cell labels (kept for label transfer)")
    p.add_argument("--size-factor-key", help="obs column of observed library sizes")
    p.add_argument("--categorical-covariate-keys", nargs="*", help="further categorical obs columns")
    p.add_argument("--continuous-covariate-keys", nargs="*", help="continuous obs columns")
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--dropout-rate", type=float, default=0.1)
    p.add_argument("--dispersion", default="gene", choices=["gene", "gene-batch", "gene-label", "gene-cell"])
    p.add_argument("--gene-likelihood", default="zinb", choices=["zinb", "nb", "poisson"])
    p.add_argument("--latent-distribution", default="normal", choices=["normal", "ln"])
    p.add_argument("--max-epochs", type=int, help="default: scvi-tools' heuristic from the number of cells")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--early-stopping", action="store_true")
    p.add_argument("--accelerator", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out after a kill")
    p.add_argument("--overwrite", action="store_true", help="replace a model already saved in --out")
    p.add_argument(
        "--nproc", type=int, default=1,
        help="data-parallel processes on this machine (gloo on CPU, nccl on GPUs); --batch-size is per process",
    )
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    out = Path(args.out)
    if (out / "model.pt").exists() and not (args.overwrite or args.resume):
        raise SystemExit(f"{out / 'model.pt'} exists: pass --overwrite to replace it or choose another --out")
    if args.nproc < 1:
        raise SystemExit(f"--nproc {args.nproc}: must be at least 1")
    if args.nproc == 1:
        _train_and_save(args)
    else:
        from scvi_scale import distributed

        distributed.launch(_train_and_save, args.nproc, args)
    return 0


def _train_and_save(args) -> None:
    """Train and save on this process: alone, or as one rank of a torch.distributed job (torchrun, --nproc)."""
    import torch

    from scvi_scale import SCVI, distributed

    out = Path(args.out)
    SCVI.setup_zarr(
        args.store,
        layer=args.layer,
        batch_key=args.batch_key,
        labels_key=args.labels_key,
        size_factor_key=args.size_factor_key,
        categorical_covariate_keys=args.categorical_covariate_keys,
        continuous_covariate_keys=args.continuous_covariate_keys,
    )
    model = SCVI(
        args.store,
        n_hidden=args.n_hidden,
        n_latent=args.n_latent,
        n_layers=args.n_layers,
        dropout_rate=args.dropout_rate,
        dispersion=args.dispersion,
        gene_likelihood=args.gene_likelihood,
        latent_distribution=args.latent_distribution,
    )
    if os.environ.get("RANK", "0") == "0":  # the process group starts inside train(); torchrun and --nproc set RANK
        print(model, flush=True)
    started = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        train_size=args.train_size,
        batch_size=args.batch_size,
        early_stopping=args.early_stopping,
        plan_kwargs={"lr": args.lr},
        checkpoint_dir=out,
        resume=args.resume,
        seed=args.seed,
    )
    seconds = time.perf_counter() - started
    distributed.on_rank_zero(lambda: model.save(out, overwrite=True))
    rank, world_size = distributed.world()
    if rank != 0:
        return
    history = model.history_
    epochs = len(history.get("elbo_train", []))
    summary = {
        "model": str(out / "model.pt"),
        "epochs": epochs,
        "seconds": round(seconds, 1),
        "processes": world_size,
        "train_cells_per_second": round(len(model.train_indices) * epochs / max(seconds, 1e-9), 1),
        "elbo_train": history["elbo_train"][-1][1] if epochs else None,
        "elbo_validation": history["elbo_validation"][-1][1] if "elbo_validation" in history else None,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary, indent=2))


def _add_convert(commands) -> None:
    p = commands.add_parser("convert", help="write an .h5ad file, a 10x folder or an AnnData-Zarr store as our store")
    p.add_argument("source")
    p.add_argument("store")
    p.add_argument("--chunk-rows", type=int, help="rows per streaming block (default: see write_store)")
    p.add_argument("--layer", help="take counts from this layer of the source instead of X")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from scvi_scale.data import write_store

    options = {"layer": args.layer}
    if args.chunk_rows:
        options["chunk_rows"] = args.chunk_rows
    write_store(args.source, args.store, **options)
    print(f"wrote {args.store}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scvi-scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_convert(commands)
    _add_train(commands)
    add_output_commands(commands)
    add_map_command(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
