"""The `scvi-scale` command line: atlas-scale jobs over Zarr stores.

    scvi-scale convert SOURCE STORE            # .h5ad, 10x folder or AnnData-Zarr -> our streaming layout
    scvi-scale train STORE --batch-key batch --out MODEL_DIR [--max-epochs N] [--resume] [--nproc N]
    torchrun --nnodes M --nproc-per-node N ... -m scvi_scale.cli train ...   # data-parallel across machines
    scvi-scale latent | normalize | de | sample STORE --model MODEL_DIR   # outputs written into the store
    scvi-scale map QUERY --reference MODEL_DIR --out MODEL_DIR [--reference-store STORE --labels-key cell_type]
    scvi-scale report STORE --model MODEL_DIR [--labels-key cell_type] [--out report/]   # needs scvi-scale[report]

One module per command group (convert.py, train.py, outputs.py, query.py, report.py), each with `add_commands(subparsers)`
registering its parsers, whose default `run` is the runner (args -> exit code). Defaults and choices come from
where they are defined (SCVI's signature, module.py's option lists), not restated here.

Errors: bad input (a damaged store, a missing column, a refused argument, an existing output) ends the command
with one line saying what is wrong, and exit code 2; anything else with one line and exit code 1. --debug shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from scvi_scale.cli import convert, outputs, query, report, train

# What the user can fix: exit code 2 with the message. (StoreError and OutputError are ValueErrors.)
BAD_INPUT = (ValueError, FileExistsError, FileNotFoundError, KeyError, TypeError, NotImplementedError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scvi-scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (convert, train, outputs, query, report):
        group.add_commands(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.debug:
        return args.run(args)
    try:
        return args.run(args)
    except BAD_INPUT as error:
        print(f"scvi-scale {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - reported in one line; --debug shows it whole
        print(f"scvi-scale {args.command}: {type(error).__name__}: {_one_line(error)} (--debug for the traceback)",
              file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
