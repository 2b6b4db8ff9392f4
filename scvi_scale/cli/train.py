"""`scvi-scale train STORE --out MODEL_DIR`: set up a store, train scVI on it and save the model, in this process
or as the ranks of a data-parallel job (`--nproc N`, or torchrun). MODEL_DIR also gets the history as a table
(history.csv) and its loss curves (loss_curves.png), and with --report the integration report.

MODEL_DIR may be an s3:// or gs:// URL: the run then works in a staging folder under TMPDIR (its lock and checkpoint
stay there, so --resume continues a killed run on the same machine) and uploads the directory when training ends,
model.pt last (persist.model_folder), so no reader sees a partial model.

One run per MODEL_DIR at a time: a run holds an flock on MODEL_DIR/LOCK_FILE (released by the OS when the process
ends, however it ends), and a second is refused. In one process, SIGINT and SIGTERM stop the run after its current
step with a checkpoint, exit code 130 / 143; `--resume` continues it (train.stop_on_signals)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from scvi_scale import SCVI, distributed, persist, settings
from scvi_scale.cli.defaults import default
from scvi_scale.data import remote
from scvi_scale.data.writer import remove_abandoned_siblings
from scvi_scale.model.training import CHECKPOINT_FILE
from scvi_scale.module import DISPERSIONS, GENE_LIKELIHOODS, LATENT_DISTRIBUTIONS
from scvi_scale.report import plot_loss_curves, write_history_table
from scvi_scale.report.history import HISTORY_TABLE, LOSS_CURVES
from scvi_scale.train import TrainingConfig, stop_on_signals

LOCK_FILE = ".train.lock"

SETUP_KEYS = (
    "layer",
    "batch_key",
    "labels_key",
    "size_factor_key",
    "categorical_covariate_keys",
    "continuous_covariate_keys",
)
MODEL_KEYS = (
    "n_hidden",
    "n_latent",
    "n_layers",
    "dropout_rate",
    "dispersion",
    "gene_likelihood",
    "latent_distribution",
)


def add_commands(commands) -> None:
    p = commands.add_parser("train", help="train scVI on a store and save the model")
    p.add_argument("store", help="AnnData-Zarr store (see `scvi-scale convert`)")
    p.add_argument("--out", required=True, help="model directory; the training checkpoint lives there too")
    p.add_argument("--layer", help="layer holding raw counts (default X)")
    p.add_argument("--batch-key", help="obs column of the batch (e.g. sample or platform)")
    p.add_argument("--labels-key", help="obs column of cell labels (kept for label transfer)")
    p.add_argument("--size-factor-key", help="obs column of observed library sizes")
    p.add_argument("--categorical-covariate-keys", nargs="*", help="further categorical obs columns")
    p.add_argument("--continuous-covariate-keys", nargs="*", help="continuous obs columns")
    for name, kind in (("n_hidden", int), ("n_latent", int), ("n_layers", int), ("dropout_rate", float)):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default(SCVI.__init__, name))
    for name, choices in (
        ("dispersion", DISPERSIONS),
        ("gene_likelihood", GENE_LIKELIHOODS),
        ("latent_distribution", LATENT_DISTRIBUTIONS),
    ):
        p.add_argument(f"--{name.replace('_', '-')}", default=default(SCVI.__init__, name), choices=choices)
    p.add_argument("--max-epochs", type=int, help="default: scvi-tools' heuristic from the number of cells")
    p.add_argument("--batch-size", type=int, default=default(SCVI.train, "batch_size"))
    p.add_argument("--train-size", type=float, default=default(SCVI.train, "train_size"))
    p.add_argument("--lr", type=float, default=TrainingConfig.lr)
    p.add_argument("--early-stopping", action="store_true")
    p.add_argument("--accelerator", default=default(SCVI.train, "accelerator"), help="auto, cpu or cuda")
    p.add_argument(
        "--seed",
        type=int,
        default=settings.seed,
        help="initial weights, split, block order and draws: the same seed gives the same model",
    )
    p.add_argument("--drop-last", action="store_true", help="leave out each epoch's last, incomplete minibatch")
    p.add_argument(
        "--checkpoint-every",
        type=float,
        default=TrainingConfig.checkpoint_every_seconds,
        metavar="SECONDS",
        help="checkpoint at least this often (and at every epoch's end), so a kill loses at most this",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="write the integration report into --out/report/ after training (needs scvi-scale[report])",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out after a kill")
    p.add_argument("--overwrite", action="store_true", help="start over, replacing the model and checkpoint in --out")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (gloo on CPU, nccl on GPUs); --batch-size is per process",
    )
    p.set_defaults(run=run_train)


@contextlib.contextmanager
def training_lock(out: Path):
    """Hold the lock of the model directory `out` for this process, or raise FileExistsError naming its holder.
    A directory this call created and that ends with nothing but the lock (a refused run) is removed again."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open(out / LOCK_FILE, "a+") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                raise FileExistsError(
                    f"{out} is being trained by another run ({file.read().strip() or 'a process'})"
                    ": wait for it to end, or choose another --out"
                ) from None
            file.truncate(0)
            file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            file.flush()
            yield
    finally:
        if created and [path.name for path in out.iterdir()] == [LOCK_FILE]:
            (out / LOCK_FILE).unlink()
            out.rmdir()


def run_train(args) -> int:
    if remote.is_url(args.out):
        return _train_into_bucket(args)
    if os.environ.get("RANK", "0") != "0":  # torchrun's other ranks: rank 0 holds the lock
        return _train_run(args)
    one_process = args.nproc == 1 and os.environ.get("WORLD_SIZE", "1") == "1"
    with training_lock(Path(args.out)), stop_on_signals() if one_process else contextlib.nullcontext():
        return _train_run(args)


def _train_into_bucket(args) -> int:
    """run_train with --out at a URL: trained into the URL's staging folder, which rank 0 uploads at the end."""
    url = args.out.rstrip("/")
    local = argparse.Namespace(**{**vars(args), "out": str(remote.staging_folder(url)), "model_url": url})
    if os.environ.get("RANK", "0") != "0":  # torchrun's other ranks write nothing
        return run_train(local)
    try:  # model_folder checks --out on entering, before any training
        with persist.model_folder(url, overwrite=args.overwrite or args.resume, keep=(CHECKPOINT_FILE, LOCK_FILE)):
            return run_train(local)
    except persist.ModelExists as error:  # in the CLI's words
        raise FileExistsError(f"{error.where} exists: pass --overwrite to replace it, or another --out") from None


def _train_run(args) -> int:
    out = Path(args.out)
    existing = [path for path in (persist.model_path(out), out / CHECKPOINT_FILE) if path.exists()]
    if existing and not (args.overwrite or args.resume):
        raise FileExistsError(
            f"{existing[0]} exists: pass --resume to continue that run, --overwrite to start over, "
            "or choose another --out"
        )
    if args.overwrite and not args.resume:
        for path in existing:
            path.unlink()
    for written in (persist.model_path(out), out / HISTORY_TABLE, out / LOSS_CURVES):
        remove_abandoned_siblings(written)  # the temporary file of a run killed while writing it
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: must be at least 1")
    if args.nproc == 1:
        train_and_save(args)
    else:
        distributed.launch(train_and_save, args.nproc, args)
    return 0


def train_and_save(args) -> None:
    """Train and save on this process: alone, or as one rank of a torch.distributed job (torchrun, --nproc)."""
    import torch

    out = Path(args.out)
    settings.seed = args.seed  # the initial weights are drawn from it when the model is built
    SCVI.setup_zarr(args.store, **{key: getattr(args, key) for key in SETUP_KEYS})
    model = SCVI(args.store, **{key: getattr(args, key) for key in MODEL_KEYS})
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
        check_val_every_n_epoch=1,  # atlas jobs report the held-out ELBO of every epoch
        checkpoint_every_seconds=args.checkpoint_every or None,
        datasplitter_kwargs={"drop_last": args.drop_last},
    )
    seconds = time.perf_counter() - started
    distributed.on_rank_zero(lambda: model.save(out, overwrite=True))
    rank, world_size = distributed.world()
    if rank != 0:
        return
    write_history_table(model.history_, out)  # history.csv, and the loss curves beside it
    plot_loss_curves(model.history_, out / LOSS_CURVES)
    if args.report:
        model.report(out / "report", overwrite=True)  # this run's --out was checked before training
    history = model.history_
    epochs = len(history.get("elbo_train", []))
    summary = {
        "model": f"{args.model_url}/{persist.MODEL_FILE}"
        if getattr(args, "model_url", None)
        else str(persist.model_path(out)),
        "epochs": epochs,
        "seconds": round(seconds, 1),
        "processes": world_size,
        "train_cells_per_second": round(len(model.train_indices) * epochs / max(seconds, 1e-9), 1),
        "elbo_train": history["elbo_train"][-1][1] if epochs else None,
        "elbo_validation": history["elbo_validation"][-1][1] if "elbo_validation" in history else None,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary, indent=2))
