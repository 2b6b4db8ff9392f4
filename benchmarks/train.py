"""Training throughput, peak memory and held-out ELBO: scvi-scale against scvi-tools' SCVI, in one run.

    .venv/bin/python benchmarks/train.py --peer-python /path/to/peer-venv/bin/python
        [--baseline-python /path/to/other-checkout/.venv/bin/python] [--sizes 100000 1000000] [--batch-sizes 128 1024]
        [--genes 2000 15000] [--steps 300] [--rounds 1] [--threads 2]
        [--elbo-cells 20000 --elbo-epochs 10 --elbo-seeds 5] [--data-dir /tmp/scvi-scale-bench]

Both sides train the same architecture (scvi-tools' SCVI defaults: 128 hidden, 10 latent, 1 layer, ZINB, gene
dispersion, batch as covariate) on the same synthetic store (scvi_scale.datasets.synthetic_atlas, --genes genes).
scvi-scale streams the store from Zarr; scvi-tools reads it into memory (anndata.read_zarr) first, so it runs only at
the sizes given with --peer-sizes (default: the smallest). Each case runs in its own process, so its peak RSS is its
own (ru_maxrss). Throughput is cells per second over `--steps` optimizer steps of one epoch, timed around train(),
after a 20-step warm-up run in the same process on both sides (torch.compile, Lightning's start-up, first reads).

--baseline-python runs scvi-scale's side again with another checkout's environment (e.g. main before a change),
alternating with this one, so a change's effect on throughput is measured in the same run. --rounds N runs every
side N times, interleaved (ours, baseline, peer, ours, ...), and the table gives each side's median with every round.

Held-out ELBO: each side trains on the same 90% of an atlas with seeds 0 .. --elbo-seeds - 1 and is scored on the
other 10%. After 2 epochs on 5,000 cells the seed-to-seed spread is ~30 nats (2.5%) on either side, so one seed
cannot tell a 1% difference: the table gives every seed and the means. Where the step's time goes:
benchmarks/profile_step.py; training beside busy processes: benchmarks/contention.py.

The peer environment (scvi-tools wants its own torch and lightning; keep it out of .venv):
    python3 -m venv peer && peer/bin/pip install torch==2.13.0 && peer/bin/pip install scvi-tools==1.4.2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

OURS_THROUGHPUT = r"""
import json, resource, sys, time, torch
from scvi_scale import SCVI
store, batch_size, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
SCVI.setup_zarr(store, batch_key="batch")
SCVI(store).train(max_epochs=1, batch_size=batch_size, max_steps=20)  # warm-up: torch.compile, first reads
model = SCVI(store)
started = time.perf_counter()
model.train(max_epochs=steps, batch_size=batch_size, max_steps=steps)  # epochs enough: max_steps ends it
seconds = time.perf_counter() - started
print(json.dumps({"cells_per_s": steps * batch_size / seconds, "peak_rss_mb":
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PEER_THROUGHPUT = r"""
import json, logging, resource, sys, time, warnings, torch, anndata, scvi
warnings.filterwarnings("ignore"); logging.getLogger("lightning").setLevel(logging.ERROR)
store, batch_size, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
adata = anndata.read_zarr(store)
scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
scvi.model.SCVI(adata).train(max_epochs=1, batch_size=batch_size, max_steps=20, accelerator="cpu",
                             enable_progress_bar=False)  # warm-up, as for scvi-scale
model = scvi.model.SCVI(adata)
started = time.perf_counter()
model.train(max_epochs=steps, batch_size=batch_size, max_steps=steps, accelerator="cpu", enable_progress_bar=False)
seconds = time.perf_counter() - started
print(json.dumps({"cells_per_s": steps * batch_size / seconds, "peak_rss_mb":
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "version": scvi.__version__}))
"""

OURS_ELBO = r"""
import json, sys, torch
from scvi_scale import SCVI, settings
train_store, test_store, model_dir = sys.argv[1], sys.argv[2], sys.argv[5]
epochs, threads = int(sys.argv[3]), int(sys.argv[4])
seed = int(sys.argv[6])
torch.set_num_threads(threads)
settings.seed = seed  # the initial weights too, as scvi.settings.seed on the peer's side
SCVI.setup_zarr(train_store, batch_key="batch")
model = SCVI(train_store)
model.train(max_epochs=epochs, seed=seed)
model.save(model_dir, overwrite=True)
held_out = SCVI.load(model_dir, test_store)
torch.manual_seed(0)
print(json.dumps({"test_elbo": held_out.get_elbo()}))
"""

PEER_ELBO = r"""
import json, logging, sys, warnings, torch, anndata, scvi
warnings.filterwarnings("ignore"); logging.getLogger("lightning").setLevel(logging.ERROR)
train_store, test_store = sys.argv[1], sys.argv[2]
epochs, threads, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
scvi.settings.seed = seed
train, test = anndata.read_zarr(train_store), anndata.read_zarr(test_store)
scvi.model.SCVI.setup_anndata(train, batch_key="batch")
model = scvi.model.SCVI(train)
model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
torch.manual_seed(0)
print(json.dumps({"test_elbo": float(model.get_elbo(test))}))
"""


def run_json(python: str, script: str, *args, threads: int) -> dict:
    """Run `script` with `python` in a fresh process (OMP_NUM_THREADS=threads) and parse the JSON it prints last."""
    env = {**os.environ, "SCVI_SCALE_PROGRESS": "0", "OMP_NUM_THREADS": str(threads)}
    # cwd: a fresh folder, so that `python -c` imports the package installed in that python's venv, not the one here
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run(
            [python, "-c", script, *map(str, args)], capture_output=True, text=True, env=env, cwd=folder
        )
    if result.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def atlas(data_dir: Path, n_cells: int, n_genes: int = 2000) -> Path:
    """A cached synthetic store of n_cells x n_genes (4 batches, 8 cell types)."""
    from scvi_scale.datasets import synthetic_atlas

    path = data_dir / (f"train-bench-{n_cells}.zarr" if n_genes == 2000 else f"train-bench-{n_cells}x{n_genes}.zarr")
    if not path.exists():
        synthetic_atlas(path, n_cells=n_cells, n_genes=n_genes, seed=0)
    return path


def split_store(path: Path) -> tuple[Path, Path]:
    """Train and test stores beside `path`: its rows shuffled, 90% / 10% (test cells are never trained on)."""
    import anndata
    import numpy as np

    from scvi_scale.data import write_store

    train_path, test_path = path.with_name(f"{path.stem}-train.zarr"), path.with_name(f"{path.stem}-test.zarr")
    if not (train_path.exists() and test_path.exists()):
        adata = anndata.read_zarr(path)
        order = np.random.default_rng(0).permutation(adata.n_obs)
        cut = int(0.9 * adata.n_obs)
        write_store(adata[np.sort(order[:cut])].copy(), train_path, overwrite=True)
        write_store(adata[np.sort(order[cut:])].copy(), test_path, overwrite=True)
    return train_path, test_path


def median_and_rounds(values: list[float]) -> str:
    """'9,787' for one run; '9,787 (9,896 / 9,876 / 7,692)': the median, then every round in order."""
    median = f"{statistics.median(values):,.0f}"
    return median if len(values) == 1 else f"{median} ({' / '.join(f'{v:,.0f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", help="python of an environment with scvi-tools (omit to skip the peer)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--peer-sizes", type=int, nargs="+", help="sizes at which the peer runs (default: smallest)")
    parser.add_argument("--baseline-python", help="python of another scvi-scale checkout's environment, run beside")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--genes", type=int, nargs="+", default=[2000])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side, interleaved; the table: medians")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--elbo-cells", type=int, default=20_000)
    parser.add_argument("--elbo-epochs", type=int, default=10)
    parser.add_argument("--elbo-seeds", type=int, default=1, help="seeds 0 .. N-1 on each side (0: skip)")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/scvi-scale-bench"))
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    peer_sizes = set(args.peer_sizes or [min(args.sizes)]) if args.peer_python else set()

    print(f"## Training throughput ({args.threads} threads, {args.steps} steps)\n")
    baseline_columns = " baseline cells/s | peak RSS MB |" if args.baseline_python else ""
    print(
        "| cells | genes | batch | scvi-scale cells/s | peak RSS MB |"
        + baseline_columns
        + " scvi-tools cells/s | peak RSS MB | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|" + "---|---|" * bool(args.baseline_python))
    for n_cells in args.sizes:
        for n_genes in args.genes:
            store = atlas(args.data_dir, n_cells, n_genes)
            for batch_size in args.batch_sizes:
                steps = max(20, args.steps * 128 // batch_size)
                sides = {"ours": sys.executable, "baseline": args.baseline_python}
                if n_cells in peer_sizes:
                    sides["peer"] = args.peer_python
                rounds: dict[str, list[dict]] = {side: [] for side, python in sides.items() if python}
                for _ in range(args.rounds):  # interleaved, so the host's drift falls on every side alike
                    for side in rounds:
                        script = PEER_THROUGHPUT if side == "peer" else OURS_THROUGHPUT
                        rounds[side].append(
                            run_json(sides[side], script, store, batch_size, steps, args.threads, threads=args.threads)
                        )
                cells = {side: [run["cells_per_s"] for run in runs] for side, runs in rounds.items()}
                rss = {side: max(run["peak_rss_mb"] for run in runs) for side, runs in rounds.items()}
                row = [f"{n_cells:,}", f"{n_genes:,}", str(batch_size)]
                for side in ("ours", "baseline", "peer"):
                    if side == "baseline" and not args.baseline_python:
                        continue
                    if side in cells:
                        row += [median_and_rounds(cells[side]), f"{rss[side]:,.0f}"]
                    else:
                        row += ["-", "-"]
                ratio = statistics.median(cells["ours"]) / statistics.median(cells["peer"]) if "peer" in cells else None
                row.append("-" if ratio is None else f"{ratio:.2f}")
                print("| " + " | ".join(row) + " |", flush=True)

    if args.elbo_seeds < 1:
        return
    print(f"\n## Held-out ELBO per cell after {args.elbo_epochs} epochs ({args.elbo_cells:,} cells, 10% held out)\n")
    train_store, test_store = split_store(atlas(args.data_dir, args.elbo_cells))
    print("| seed | scvi-scale | scvi-tools |\n|---|---|---|")
    ours, peer = [], []
    for seed in range(args.elbo_seeds):
        ours.append(
            run_json(
                sys.executable,
                OURS_ELBO,
                train_store,
                test_store,
                args.elbo_epochs,
                args.threads,
                args.data_dir / "elbo-model",
                seed,
                threads=args.threads,
            )["test_elbo"]
        )
        peer.append(
            float("nan")
            if not args.peer_python
            else run_json(
                args.peer_python,
                PEER_ELBO,
                train_store,
                test_store,
                args.elbo_epochs,
                args.threads,
                seed,
                threads=args.threads,
            )["test_elbo"]
        )
        print(f"| {seed} | {ours[-1]:.2f} | {peer[-1]:.2f} |", flush=True)

    def mean_and_spread(values: list[float]) -> str:
        if any(v != v for v in values):  # no peer: NaN
            return "-"
        spread = f" (sd {statistics.stdev(values):.1f})" if len(values) > 1 else ""
        return f"{statistics.mean(values):.2f}{spread}"

    print(f"| mean | {mean_and_spread(ours)} | {mean_and_spread(peer)} |")
    if args.peer_python:
        mean_ours, mean_peer = statistics.mean(ours), statistics.mean(peer)
        print(f"\nrelative difference of the means: {(mean_ours - mean_peer) / abs(mean_peer):+.2%}")


if __name__ == "__main__":
    main()
