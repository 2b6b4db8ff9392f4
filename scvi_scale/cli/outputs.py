"""`scvi-scale latent | normalize | de | sample`: a trained model's outputs written into a store:

    scvi-scale latent    STORE --model MODEL_DIR [--key X_scvi] [--return-dist]          -> obsm/<key>
    scvi-scale normalize STORE --model MODEL_DIR [--key scvi_normalized] [--transform-batch B ...]  -> layers/<key>
    scvi-scale de        STORE --model MODEL_DIR --groupby cell_type [--mode change] [--table de.parquet] -> uns/<key>
    scvi-scale sample    STORE --model MODEL_DIR [--key scvi_samples] [--n-samples 1]     -> layers/<key> (CSR)

Common options: --output-store PATH (write to a separate AnnData store instead), --overwrite, --workers N (a local
dask cluster of N worker processes; or --scheduler ADDRESS of a running one), --batch-size, --chunk-rows, --seed.
A command that was killed resumes its unfinished output when run again with the same options. Each prints a JSON
summary.
"""

from __future__ import annotations

import contextlib
import json
import time

from scvi_scale import SCVI
from scvi_scale.cli.defaults import default
from scvi_scale.outputs.de import MODES
from scvi_scale.outputs.differential import DEOptions


def _common(parser) -> None:
    parser.add_argument("store", help="the AnnData-Zarr store the model was trained on (or one with the same genes)")
    parser.add_argument("--model", required=True, help="model directory written by `scvi-scale train` / model.save")
    parser.add_argument("--output-store", help="write into this AnnData store (created if missing) instead of STORE")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output of the same key")
    parser.add_argument("--workers", type=int, default=0, help="dask worker processes (default 0: in-process)")
    parser.add_argument("--scheduler", help="address of a running dask scheduler to use instead of --workers")
    parser.add_argument("--batch-size", type=int, help="cells per forward pass (default 1024)")
    parser.add_argument("--chunk-rows", type=int, help="cells per written chunk (default: the store's chunk rows)")
    parser.add_argument("--seed", type=int, default=0)


def _transform_batch(parser) -> None:
    parser.add_argument("--transform-batch", nargs="+", help="decode every cell in these batches (averaged)")


def add_commands(subparsers) -> None:
    """Register the latent, normalize, de and sample subcommands on an argparse subparsers object."""
    latent = subparsers.add_parser("latent", help="write the latent representation as obsm/<key>")
    _common(latent)
    latent.add_argument("--key", default="X_scvi")
    latent.add_argument("--sample", action="store_true", help="one draw of q(z | x) instead of its mean")
    latent.add_argument(
        "--mc-samples",
        type=int,
        default=default(SCVI.get_latent_representation, "mc_samples"),
        help='draws for the mean with latent "ln"',
    )
    latent.add_argument("--return-dist", action="store_true", help="also write the variance as obsm/<key>_var")
    latent.set_defaults(run=run_latent)

    normalize = subparsers.add_parser("normalize", help="write the normalized expression as layers/<key>")
    _common(normalize)
    normalize.add_argument("--key", default="scvi_normalized")
    _transform_batch(normalize)
    normalize.add_argument("--library-size", default="1", help='a number, or "latent" for px_rate')
    normalize.add_argument("--n-samples", type=int, default=1, help="posterior draws averaged per cell")
    normalize.set_defaults(run=run_normalize)

    de = subparsers.add_parser("de", help="differential expression; the table goes to uns/<key> (and --table)")
    _common(de)
    de.add_argument("--groupby", help="obs column of the groups")
    de.add_argument("--group1", nargs="+", help="groups to test (default: each group against the rest)")
    de.add_argument("--group2", help="reference group (default: all other cells)")
    de.add_argument("--mode", default=DEOptions.mode, choices=MODES)
    de.add_argument("--delta", type=float, default=DEOptions.delta)
    de.add_argument("--batch-correction", action="store_true")
    de.add_argument("--fdr-target", type=float, default=DEOptions.fdr_target)
    de.add_argument(
        "--n-samples-overall", type=int, default=DEOptions.n_samples_overall, help="posterior samples per group"
    )
    de.add_argument("--key", help="uns key (default: de_<groupby>)")
    de.add_argument("--table", help="also write the table here (parquet if pyarrow is installed, else csv)")
    de.set_defaults(run=run_de)

    sample = subparsers.add_parser("sample", help="write posterior predictive counts as CSR layers/<key>")
    _common(sample)
    sample.add_argument("--key", default="scvi_samples")
    _transform_batch(sample)
    sample.add_argument("--n-samples", type=int, default=1, help="draws per cell (<key>_0, <key>_1, ... when > 1)")
    sample.set_defaults(run=run_sample)


@contextlib.contextmanager
def _client(args):
    """A dask.distributed Client for --scheduler or --workers N, else None."""
    if not args.scheduler and args.workers < 1:
        yield None
        return
    from distributed import Client, LocalCluster

    if args.scheduler:
        with Client(args.scheduler) as client:
            yield client
        return
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True)
    with cluster, Client(cluster) as client:
        yield client


def _run(args, write) -> int:
    """Load the model, run write(model, options) with a client if asked, and print a JSON summary."""
    model = SCVI.load(args.model, args.store)
    started = time.perf_counter()
    with _client(args) as client:
        options = dict(
            output_store=args.output_store,
            overwrite=args.overwrite,
            client=client,
            model_dir=args.model if client is not None else None,
            seed=args.seed,
            chunk_rows=args.chunk_rows,
        )
        written = write(model, options)
    seconds = time.perf_counter() - started
    summary = {
        "store": args.output_store or args.store,
        "written": written,
        "cells": model.store.n_obs,
        "seconds": round(seconds, 2),
        "cells_per_second": round(model.store.n_obs / max(seconds, 1e-9), 1),
        "workers": args.workers if not args.scheduler else args.scheduler,
    }
    print(json.dumps(summary, indent=2))
    return 0


def run_latent(args) -> int:
    def write(model, options):
        model.write_latent_representation(
            args.key,
            give_mean=not args.sample,
            mc_samples=args.mc_samples,
            batch_size=args.batch_size,
            return_dist=args.return_dist,
            **options,
        )
        return [f"obsm/{args.key}"] + ([f"obsm/{args.key}_var"] if args.return_dist else [])

    return _run(args, write)


def run_normalize(args) -> int:
    library_size = args.library_size if args.library_size == "latent" else float(args.library_size)

    def write(model, options):
        model.get_normalized_expression(
            transform_batch=args.transform_batch,
            library_size=library_size,
            n_samples=args.n_samples,
            batch_size=args.batch_size,
            write_to=args.key,
            **options,
        )
        return [f"layers/{args.key}"]

    return _run(args, write)


def run_de(args) -> int:
    if not args.groupby:
        raise ValueError("--groupby is required (the obs column of the groups)")
    key = args.key or f"de_{args.groupby}"

    def write(model, options):
        model.differential_expression(
            groupby=args.groupby,
            group1=args.group1,
            group2=args.group2,
            mode=args.mode,
            delta=args.delta,
            batch_size=args.batch_size,
            batch_correction=args.batch_correction,
            fdr_target=args.fdr_target,
            silent=True,
            n_samples_overall=args.n_samples_overall,
            write_to=key,
            table_path=args.table,
            **options,
        )
        return [f"uns/{key}"] + ([args.table] if args.table else [])

    return _run(args, write)


def run_sample(args) -> int:
    def write(model, options):
        model.posterior_predictive_sample(
            transform_batch=args.transform_batch,
            n_samples=args.n_samples,
            batch_size=args.batch_size,
            write_to=args.key,
            **options,
        )
        keys = [args.key] if args.n_samples == 1 else [f"{args.key}_{draw}" for draw in range(args.n_samples)]
        return [f"layers/{key}" for key in keys]

    return _run(args, write)
