"""Time to quality: held-out ELBO against wall time, and k-NN integration scores, for scvi-tools' default recipe
and scvi-scale's (the same recipe, and a faster one: larger batches at a larger learning rate), in one run.

    .venv/bin/python benchmarks/recipe.py --peer-python /path/to/peer-venv/bin/python
        [--store synthetic --cells 50000 | --store cellbench] [--epochs 10] [--seeds 0 1 2]
        [--fast-batch-size 256 --fast-lr 6e-3] [--also 256:6e-3:5:10 ...]
        [--plot benchmarks/recipe.png]   # the PNG, and its runs as .json

--also adds scvi-scale recipes as BATCH:LR:KL_WARMUP_EPOCHS:EPOCHS (a KL warm-up over that many epochs instead of
scvi-tools' 400, trained for EPOCHS epochs, which may be fewer than --epochs: how soon such a recipe reaches the
peer's quality is read from its own end, test ELBO and k-NN scores included).

The store is split once, 90% / 10% (benchmarks/train.py's split_store). Every run trains on the 90% with
train_size=0.9 and validation every epoch (check_val_every_n_epoch=1), so the 10% of it that it never trains on
give an ELBO per epoch (`elbo_validation`, a negative ELBO per cell: lower is better); each side draws its own
validation cells. The quality at the end is the negative ELBO of the test 10%, the same cells for every run.
Wall time per epoch: scvi-scale's `epoch_seconds` from its history, scvi-tools' from a Lightning callback at each
train epoch's end; both include the epoch's validation. Each run is a fresh
process that first trains 20 steps (torch.compile, Lightning's start-up, first reads), as benchmarks/train.py does.

Integration at the end of a run, on the latent of one fixed subsample of the training store (at most 10,000
cells, the same cells for every run), with scvi_scale.report.metrics (scib-metrics, k = 90 exact neighbours):
iLISI (batch mixing), cLISI (label purity) and graph connectivity, each in [0, 1], higher is better.

"time to peer" = the wall time at which a run's validation ELBO first reaches the peer's final one (mean over seeds
of each), and "ratio" = the peer's total time over it. --store cellbench: ../shared/data/cellbench_3cl.h5ad, its
2,000 genes most variable within the platforms (as tests/test_model.py picks them), batch = platform, labels = cell
line; synthetic: scvi_scale.datasets.synthetic_atlas (4 batches, 8 cell types).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

SCORED_CELLS = 10_000
SHARED_CELLBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cellbench_3cl.h5ad"

OURS = r"""
import json, sys, numpy as np, torch
from scvi_scale import SCVI, settings
store, test_store, batch_key, batch_size, lr, epochs, seed, rows_path, latent_path, plan = sys.argv[1:11]
batch_size, lr, epochs, seed, plan = int(batch_size), float(lr), int(epochs), int(seed), json.loads(plan)
torch.set_num_threads(int(sys.argv[11]))
SCVI.setup_zarr(store, batch_key=batch_key)
SCVI(store).train(max_epochs=1, batch_size=batch_size, max_steps=20)  # warm-up: torch.compile, first reads
settings.seed = seed
model = SCVI(store)
model.train(max_epochs=epochs, batch_size=batch_size, plan_kwargs={"lr": lr, **plan}, train_size=0.9,
            check_val_every_n_epoch=1, seed=seed)
np.save(latent_path, model.get_latent_representation(indices=np.load(rows_path)))
seconds = np.cumsum([s for _, s in model.history_["epoch_seconds"]]).tolist()
model.save(latent_path + ".model", overwrite=True)
torch.manual_seed(0)
test_elbo = -SCVI.load(latent_path + ".model", test_store).get_elbo()  # a negative ELBO, as elbo_validation
print(json.dumps({"seconds": seconds, "elbo": [e for _, e in model.history_["elbo_validation"]],
                  "test_elbo": test_elbo}))
"""

PEER = r"""
import json, logging, sys, time, warnings, numpy as np, torch, anndata, scvi
from lightning.pytorch import Callback
warnings.filterwarnings("ignore"); logging.getLogger("lightning").setLevel(logging.ERROR)
store, test_store, batch_key, batch_size, lr, epochs, seed, rows_path, latent_path, plan = sys.argv[1:11]
batch_size, lr, epochs, seed, plan = int(batch_size), float(lr), int(epochs), int(seed), json.loads(plan)
torch.set_num_threads(int(sys.argv[11]))

class Clock(Callback):
    def on_train_start(self, trainer, module):
        self.started, self.seconds = time.perf_counter(), []
    def on_train_epoch_end(self, trainer, module):
        self.seconds.append(time.perf_counter() - self.started)

adata = anndata.read_zarr(store)
scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
scvi.model.SCVI(adata).train(max_epochs=1, batch_size=batch_size, max_steps=20, accelerator="cpu",
                             enable_progress_bar=False)  # warm-up, as for scvi-scale
scvi.settings.seed = seed
model, clock = scvi.model.SCVI(adata), Clock()
model.train(max_epochs=epochs, batch_size=batch_size, plan_kwargs={"lr": lr, **plan}, train_size=0.9,
            check_val_every_n_epoch=1, accelerator="cpu", enable_progress_bar=False, callbacks=[clock])
np.save(latent_path, model.get_latent_representation(indices=np.load(rows_path)))
elbo = model.history["elbo_validation"]["elbo_validation"].tolist()
torch.manual_seed(0)
test_elbo = -float(model.get_elbo(anndata.read_zarr(test_store)))
print(json.dumps({"seconds": clock.seconds, "elbo": elbo, "test_elbo": test_elbo}))
"""


def cellbench_store(data_dir: Path) -> tuple[Path, str, str]:
    """The cellbench counts on their 2,000 genes most variable within each platform, as a store."""
    import anndata

    from scvi_scale.data import write_store

    path = data_dir / "recipe-cellbench.zarr"
    if not path.exists():
        if not SHARED_CELLBENCH.exists():
            raise SystemExit(f"--store cellbench needs {SHARED_CELLBENCH}")
        adata = anndata.read_h5ad(SHARED_CELLBENCH)
        counts = adata.X.toarray()
        log_normalized = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
        platform = adata.obs["batch"].to_numpy()
        within = np.mean([log_normalized[platform == p].var(0) for p in np.unique(platform)], axis=0)
        write_store(adata[:, np.sort(np.argsort(within)[-2000:])].copy(), path)
    return path, "batch", "cell_line"


def knn_scores(latent: np.ndarray, batches: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """iLISI, cLISI and graph connectivity of one latent (scib-metrics through scvi_scale.report.metrics)."""
    from scvi_scale.report import metrics

    scores = metrics.scib_scores(latent, metrics.nearest_neighbors(latent), latent, batches, labels)
    return {name: scores[name] for name in ("iLISI", "cLISI", "Graph connectivity")}


def first_time_reaching(run: dict, target: float) -> float | None:
    """Wall seconds at the end of the first epoch whose held-out ELBO is at or below `target` (None if none is)."""
    return next((seconds for seconds, elbo in zip(run["seconds"], run["elbo"]) if elbo <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", required=True, help="python of an environment with scvi-tools")
    parser.add_argument("--store", choices=("synthetic", "cellbench"), default="synthetic")
    parser.add_argument("--cells", type=int, default=50_000, help="synthetic store's cells")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fast-batch-size", type=int, default=256)
    parser.add_argument("--fast-lr", type=float, default=6e-3)
    parser.add_argument(
        "--also",
        nargs="*",
        default=[],
        metavar="BATCH:LR:KL_WARMUP_EPOCHS:EPOCHS",
        help="more scvi-scale recipes, e.g. 256:6e-3:5:10",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/scvi-scale-bench"))
    parser.add_argument("--plot", type=Path, help="PNG of held-out ELBO against wall time")
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)

    from scvi_scale.data import CountStore
    from scvi_scale.report import metrics

    sys.path.insert(0, str(Path(__file__).parent))
    from train import atlas, run_json, split_store

    whole, batch_key, labels_key = (
        cellbench_store(args.data_dir)
        if args.store == "cellbench"
        else (atlas(args.data_dir, args.cells), "batch", "cell_type")
    )
    store, test_store = split_store(whole)
    opened = CountStore(store)
    scored = np.sort(np.random.default_rng(0).permutation(opened.n_obs)[:SCORED_CELLS])
    batches = metrics.category_codes(opened.obs_column(batch_key).to_numpy()[scored])
    labels = metrics.category_codes(opened.obs_column(labels_key).to_numpy()[scored])
    sides = {  # name: (python, script, batch size, learning rate, plan_kwargs beyond lr, epochs)
        "scvi-tools (default: batch 128, lr 1e-3)": (args.peer_python, PEER, 128, 1e-3, {}, args.epochs),
        "scvi-scale (default: batch 128, lr 1e-3)": (sys.executable, OURS, 128, 1e-3, {}, args.epochs),
        f"scvi-scale (fast: batch {args.fast_batch_size}, lr {args.fast_lr:g})": (
            sys.executable,
            OURS,
            args.fast_batch_size,
            args.fast_lr,
            {},
            args.epochs,
        ),
    }
    for recipe in args.also:
        batch_size, lr, kl_warmup, epochs = recipe.split(":")
        sides[
            f"scvi-scale (also: batch {batch_size}, lr {float(lr):g}, KL warm-up {kl_warmup} epochs, {epochs} epochs)"
        ] = (sys.executable, OURS, int(batch_size), float(lr), {"n_epochs_kl_warmup": int(kl_warmup)}, int(epochs))
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as scratch:
        rows_path, latent_path = Path(scratch) / "rows.npy", Path(scratch) / "latent.npy"
        np.save(rows_path, scored)
        for seed in args.seeds:  # sides interleaved, so that a slower spell of the host touches each alike
            for name, (python, script, batch_size, lr, plan, epochs) in sides.items():
                run = run_json(
                    python,
                    script,
                    store,
                    test_store,
                    batch_key,
                    batch_size,
                    lr,
                    epochs,
                    seed,
                    rows_path,
                    latent_path,
                    json.dumps(plan),
                    args.threads,
                    threads=args.threads,
                )
                run["scores"] = knn_scores(np.load(latent_path), batches, labels)
                runs[name].append(run)
                print(
                    f"seed {seed} {name}: {run['seconds'][-1]:.1f} s, validation ELBO {run['elbo'][-1]:.2f}, "
                    f"test ELBO {run['test_elbo']:.2f}, "
                    f"{run['scores']}",
                    file=sys.stderr,
                    flush=True,
                )

    peer_name = next(iter(sides))
    peer_final = statistics.mean(run["elbo"][-1] for run in runs[peer_name])
    peer_seconds = statistics.mean(run["seconds"][-1] for run in runs[peer_name])
    print(
        f"## Time to quality: {whole.name}, {opened.n_obs:,} training cells, {args.epochs} epochs, seeds "
        f"{args.seeds}, {args.threads} threads\n"
    )
    print(
        "| recipe | wall s | validation ELBO | test ELBO | iLISI | cLISI | graph conn. | time to peer's "
        "validation ELBO, s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, name_runs in runs.items():
        mean_curve = {
            "seconds": np.mean([r["seconds"] for r in name_runs], axis=0).tolist(),
            "elbo": np.mean([r["elbo"] for r in name_runs], axis=0).tolist(),
        }
        reached = first_time_reaching(mean_curve, peer_final)
        scores = {key: statistics.mean(r["scores"][key] for r in name_runs) for key in name_runs[0]["scores"]}
        test_elbo = statistics.mean(r["test_elbo"] for r in name_runs)
        print(
            f"| {name} | {mean_curve['seconds'][-1]:.1f} | {mean_curve['elbo'][-1]:.2f} | {test_elbo:.2f} | "
            f"{scores['iLISI']:.3f} | {scores['cLISI']:.3f} | {scores['Graph connectivity']:.3f} | "
            f"{'-' if reached is None else f'{reached:.1f}'} | "
            f"{'-' if reached is None else f'{peer_seconds / reached:.2f}x'} |"
        )
    print(
        "\nper seed, test ELBO: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{r['test_elbo']:.2f}" for r in name_runs) for name, name_runs in runs.items()
        )
    )

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4.5))
        marker = "o" if args.epochs <= 50 else None
        for name, name_runs in runs.items():
            for index, run in enumerate(name_runs):
                axis.plot(
                    run["seconds"],
                    run["elbo"],
                    marker=marker,
                    markersize=3,
                    alpha=0.8,
                    color=f"C{list(runs).index(name)}",
                    label=name if index == 0 else None,
                )
        axis.axhline(peer_final, color="grey", linestyle=":", label="scvi-tools' final (mean over seeds)")
        # a large learning rate's first epochs can be far above the rest: the axis stops above the peer's first
        lowest = min(min(run["elbo"]) for name_runs in runs.values() for run in name_runs)
        axis.set_ylim(lowest - 0.01 * abs(lowest), 1.1 * statistics.median(run["elbo"][0] for run in runs[peer_name]))
        axis.set_xlabel("wall time, s (training and per-epoch validation)")
        axis.set_ylabel("validation negative ELBO per cell (lower is better)")
        axis.set_title(f"{whole.name}: {opened.n_obs:,} cells, {args.epochs} epochs, {args.threads} threads")
        axis.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        args.plot.with_suffix(".json").write_text(json.dumps(runs))
        print(f"\nplot: {args.plot}; the runs behind it: {args.plot.with_suffix('.json')}")


if __name__ == "__main__":
    main()
