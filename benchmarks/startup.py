"""Start-up: what a fresh process pays before and during its first job, scvi-scale against scvi-tools, in one run.

    .venv/bin/python benchmarks/startup.py --peer-python /path/to/peer-venv/bin/python
        [--baseline-python /path/to/other-checkout/.venv/bin/python] [--cells 20000] [--genes 2000] [--epochs 2]
        [--batch-size 128] [--threads 2] [--repeats 2]

Each side runs in fresh processes, with every cache empty ("cold": a new HOME cache, TMPDIR and
TORCHINDUCTOR_CACHE_DIR) and then again with the caches the cold run left ("warm"). A process reports its
timeline: `import` (the package), `setup` (registering the data and building the model), `first train` (--epochs
epochs at --batch-size), `second train` (a new model, the same epochs, in the same process), `first outputs`
(latent representation and normalized expression of every cell) and `second outputs`; `job` is the whole
process's wall time from the parent (interpreter start, imports, setup, the first train and nothing else: a
pipeline's short training job). scvi-scale trains on the Zarr store, scvi-tools on the same counts read from it
into memory (anndata.read_zarr, counted in its setup). --baseline-python runs scvi-scale's side again with another
checkout's environment (e.g. main before a change) in the same run. The last column says whether the process
imported torch._dynamo (torch.optim's optimizers and Lightning do, at seconds of start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train import atlas  # noqa: E402

OURS = r"""
import time; started = time.perf_counter()
import json, sys
from scvi_scale import SCVI
import torch
timeline = {"import": time.perf_counter() - started}
store, epochs, batch_size, outputs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
def mark(name, since):
    timeline[name] = time.perf_counter() - since
    return time.perf_counter()
now = time.perf_counter()
SCVI.setup_zarr(store, batch_key="batch")
model = SCVI(store)
now = mark("setup", now)
model.train(max_epochs=epochs, batch_size=batch_size)
now = mark("first train", now)
if outputs:
    SCVI(store).train(max_epochs=epochs, batch_size=batch_size)
    now = mark("second train", now)
    for call in ("first outputs", "second outputs"):
        model.get_latent_representation(); model.get_normalized_expression()
        now = mark(call, now)
timeline["dynamo"] = "torch._dynamo" in sys.modules
print(json.dumps(timeline))
"""

PEER = r"""
import time; started = time.perf_counter()
import json, logging, sys, warnings
import scvi, anndata
import torch
timeline = {"import": time.perf_counter() - started}
warnings.filterwarnings("ignore"); logging.getLogger("lightning").setLevel(logging.ERROR)
store, epochs, batch_size, outputs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
def mark(name, since):
    timeline[name] = time.perf_counter() - since
    return time.perf_counter()
def train(model):
    model.train(max_epochs=epochs, batch_size=batch_size, accelerator="cpu", enable_progress_bar=False)
now = time.perf_counter()
adata = anndata.read_zarr(store)
scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
model = scvi.model.SCVI(adata)
now = mark("setup", now)
train(model)
now = mark("first train", now)
if outputs:
    train(scvi.model.SCVI(adata))
    now = mark("second train", now)
    for call in ("first outputs", "second outputs"):
        model.get_latent_representation(); model.get_normalized_expression()
        now = mark(call, now)
timeline["dynamo"] = "torch._dynamo" in sys.modules
print(json.dumps(timeline))
"""

COLUMNS = ("job", "import", "setup", "first train", "second train", "first outputs", "second outputs")


def run(python: str, script: str, caches: Path, threads: int, *args) -> dict:
    """`script` in a fresh process whose caches all live under `caches`; its timeline and its wall time ("job")."""
    caches.mkdir(parents=True, exist_ok=True)
    for name in ("xdg", "tmp", "inductor", "home"):
        (caches / name).mkdir(exist_ok=True)
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(caches / "xdg"),
        "TMPDIR": str(caches / "tmp"),
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "HOME": str(caches / "home"),
        "SCVI_SCALE_PROGRESS": "0",
        "OMP_NUM_THREADS": str(threads),
        "MPLCONFIGDIR": str(caches / "tmp"),
    }
    env.pop("SCVI_SCALE_CACHE_DIR", None)
    started = time.perf_counter()
    # cwd: a fresh folder, so that `python -c` imports the package installed in that python's venv, not the one here
    result = subprocess.run(
        [python, "-c", script, *map(str, args)], capture_output=True, text=True, env=env, cwd=caches / "tmp"
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "job": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", help="python of an environment with scvi-tools (omit to skip the peer)")
    parser.add_argument("--baseline-python", help="python of another scvi-scale checkout's environment, run beside")
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="cold/warm pairs per side, each in new caches")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "scvi-scale-bench")
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    store = atlas(args.data_dir, args.cells, args.genes)
    sides = [("scvi-scale", sys.executable, OURS)]
    if args.baseline_python:
        sides.append(("baseline", args.baseline_python, OURS))
    if args.peer_python:
        sides.append(("scvi-tools", args.peer_python, PEER))
    rows = []
    with tempfile.TemporaryDirectory(prefix="startup-caches-") as scratch:
        for repeat in range(args.repeats):
            for side, python, script in sides:  # interleaved, so a slow spell of the host hits both sides
                caches = Path(scratch) / f"{side}-{repeat}"
                for state in ("cold", "warm"):
                    timeline = run(python, script, caches, args.threads, store, args.epochs, args.batch_size, 1)
                    rows.append((side, state, repeat, timeline))
                    print(json.dumps({"side": side, "caches": state, "repeat": repeat, **timeline}), flush=True)
                    job = (
                        run(
                            python,
                            script,
                            Path(scratch) / f"{side}-{repeat}-job-{state}",
                            args.threads,
                            store,
                            args.epochs,
                            args.batch_size,
                            0,
                        )
                        if state == "cold"
                        else None
                    )
                    if job is not None:
                        rows.append((side, "cold job", repeat, job))
                        print(json.dumps({"side": side, "caches": "cold job", "repeat": repeat, **job}), flush=True)
    print(
        f"\n{args.cells} cells x {args.genes} genes, {args.epochs} epochs at batch {args.batch_size}, "
        f"{args.threads} threads; seconds (min over {args.repeats} repeats; 'cold job': a process that sets up "
        "and trains once, nothing else)\n"
    )
    print("| side | caches | " + " | ".join(COLUMNS) + " | torch._dynamo imported |")
    print("| --- | --- |" + " --- |" * (len(COLUMNS) + 1))
    for side, _, _ in sides:
        for state in ("cold job", "cold", "warm"):
            timelines = [t for s, c, _, t in rows if s == side and c == state]
            cells = [f"{min(t[c] for t in timelines):.2f}" if c in timelines[0] else "" for c in COLUMNS]
            dynamo = "yes" if any(t.get("dynamo") for t in timelines) else "no"
            print(f"| {side} | {state} | " + " | ".join(cells) + f" | {dynamo} |")
    if args.peer_python:
        ours = min(t["job"] for s, c, _, t in rows if s == "scvi-scale" and c == "cold job")
        peer = min(t["job"] for s, c, _, t in rows if s == "scvi-tools" and c == "cold job")
        print(f"\ncold job, scvi-tools / scvi-scale: {peer / ours:.2f}x")


if __name__ == "__main__":
    main()
