"""The `scvi-scale` command line: atlas-scale jobs over Zarr stores.

    scvi-scale convert SOURCE STORE            # .h5ad, 10x folder or AnnData-Zarr -> our streaming layout
    scvi-scale train STORE --batch-key batch --out MODEL_DIR [--max-epochs N] [--resume] [--nproc N]
    torchrun --nnodes M --nproc-per-node N ... -m scvi_scale.cli train ...   # data-parallel across machines
    scvi-scale latent | normalize | de | sample STORE --model MODEL_DIR   # outputs written into the store
    scvi-scale map QUERY --reference MODEL_DIR --out MODEL_DIR [--reference-store STORE --labels-key cell_type]

One module per command group (convert.py, train.py, outputs.py, query.py), each with `add_commands(subparsers)`
registering its parsers, whose default `run` is the runner (args -> exit code). Defaults and choices come from
where they are defined (SCVI's signature, module.py's option lists), not restated here.
"""

from __future__ import annotations

import argparse
import logging

from scvi_scale.cli import convert, outputs, query, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scvi-scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (convert, train, outputs, query):
        group.add_commands(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return args.run(args)
