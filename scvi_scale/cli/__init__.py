"""The `scvi-scale` command line: atlas-scale jobs over Zarr stores.

    scvi-scale convert SOURCE STORE            # .h5ad, 10x folder or AnnData-Zarr -> our streaming layout
    scvi-scale train STORE --batch-key batch --out MODEL_DIR [--max-epochs N] [--resume] [--nproc N]
    torchrun --nnodes M --nproc-per-node N ... -m scvi_scale.cli train ...   # data-parallel across machines
    scvi-scale latent | normalize | de | sample STORE --model MODEL_DIR   # outputs written into the store
    scvi-scale map QUERY --reference MODEL_DIR --out MODEL_DIR [--reference-store STORE --labels-key cell_type]
    scvi-scale report STORE --model MODEL_DIR [--labels-key cell_type] [--out report/]   # needs scvi-scale[report]

One module per command group (convert.py, train.py, outputs.py, query.py, report.py), each with
`add_commands(subparsers)` registering its parsers, whose default `run` is the runner (args -> exit code). Defaults and
choices come from where they are defined (SCVI's signature, module.py's option lists), not restated here.

Errors: bad input (a damaged store or model file, a missing column, a refused argument, an existing output) and
an OS error of a place the user named (disk full, no permission, a read-only file system) end the command with
one line saying what is wrong, where, and what to do, and exit code 2; anything else is our bug (a KeyError or
TypeError from inside included): one line and exit code 1. A train stopped by SIGINT / SIGTERM (checkpointed,
resumable) exits 130 / 143. --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from scvi_scale.cli import convert, outputs, query, report, train
from scvi_scale.train import TrainingInterrupted

# What the user can fix: exit code 2 with the message. (StoreError, OutputError and persist's refusals of a model
# file are ValueErrors; NotImplementedError is an option asked for that scvi-scale does not implement.)
BAD_INPUT = (ValueError, FileExistsError, FileNotFoundError, NotImplementedError)
# OS errors of the files and stores the user named: what to do about each (exit code 2)
NO_SPACE = "free space there (or choose another place) and run the command again: it resumes what was finished"
NO_PERMISSION = "this user may not write there: change its permissions, or choose another place"
USER_OS_ERRORS = {
    errno.ENOSPC: NO_SPACE,
    errno.EDQUOT: NO_SPACE,
    errno.EACCES: NO_PERMISSION,
    errno.EPERM: NO_PERMISSION,
    errno.EROFS: "its file system is read-only: write elsewhere (--output-store for outputs, --out for a model)",
}


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
    except Exception as error:  # noqa: BLE001 - reported in one line; --debug shows it whole
        code, line = _exit_code_and_line(args, error)
        print(f"scvi-scale {args.command}: {line}", file=sys.stderr)
        return code


def _exit_code_and_line(args, error: Exception) -> tuple[int, str]:
    """2 and what to fix for the user's input (BAD_INPUT, USER_OS_ERRORS); 1 and the error's type for our bugs."""
    if isinstance(error, TrainingInterrupted):  # 128 + the signal, as a shell reports a process it stopped
        return 128 + error.signal_number, str(error)
    if isinstance(error, BAD_INPUT):
        return 2, f"error: {_one_line(error)}"
    if isinstance(error, OSError) and error.errno in USER_OS_ERRORS:
        # a write to an open file (disk full) names no file: then the place this command writes to
        where = (
            error.filename
            or getattr(args, "output_store", None)
            or getattr(args, "out", None)
            or getattr(args, "store", None)
        )
        return 2, f"error: {where}: {error.strerror}; {USER_OS_ERRORS[error.errno]}"
    return 1, f"{type(error).__name__}: {_one_line(error)} (--debug for the traceback)"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
