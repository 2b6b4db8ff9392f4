"""Training and latent cells/s from a loopback S3 server with latency injected per request, against the local
store; and what an epoch costs in GET requests and bytes.

    .venv/bin/python benchmarks/cloud.py                                   # 200k cells x 2000 genes, 20 ms
    .venv/bin/python benchmarks/cloud.py --cells 3000 --genes 200 --latency-ms 20   # a check that it runs
    .venv/bin/python benchmarks/cloud.py --client-cpus 0-1 --server-cpus 2-7   # the server off training's cores

The store comes from scvi_scale.datasets.synthetic_atlas (made once into --data-dir, then reused) and is uploaded
to a bucket of moto's S3 server (as in tests/test_cloud.py); every request of the s3:// runs goes through the
latency proxy of tests/helpers.py (FaultyProxy), which waits --latency-ms before forwarding each one. Server and
proxy run in a subprocess of their own (no GIL shared with training), but on a machine with few cores they still
take CPU from it, so the s3:// figures are then a lower bound. On a machine with cores to spare, --client-cpus and
--server-cpus (Linux CPU lists, "0-1", "2,3") pin each side to cores of its own, as a bucket's servers are.

After one untimed run on the local store (a process's first training pays one-time costs), for each store (the
local path, the s3:// URL with no latency injected, then the s3:// URL through --latency-ms a request), with the
same seed and torch threads:
    setup_s      seconds of setup_zarr (one validating pass over all counts)
    train        cells/s of the training epochs (run_info["train_cells_per_second"])
    latent       cells/s of get_latent_representation over every cell
and for the s3:// runs, counted at the proxy: requests_per_epoch_per_million_cells (every method),
get_requests_per_epoch_per_million_cells and get_bytes_per_epoch_per_million_cells over the training epochs
(validation passes included), latent_get_requests_per_million_cells, and server_cpu_s: the CPU seconds the server
subprocess (moto and the proxy) spent on training's and on the latent's requests, taken from the cores training
runs on. Prints one JSON object; "ratio" holds s3 / local for train and latent (the issue's bar: at least 0.8),
"latency_hidden" s3 / s3_no_latency (1.0: the latency costs nothing beyond serving the requests).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # FaultyProxy, shared with the tests

KEY, SECRET = "bench-key", "bench-secret"  # the fake server's credentials
BUCKET = "atlas"


def serve(latency_ms: float) -> None:
    """Subprocess body: moto's server and the latency proxy in front of it; answers commands on stdin."""
    import logging

    from helpers import FaultyProxy
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    direct = f"http://127.0.0.1:{port}"
    proxy = FaultyProxy(direct)
    proxy.latency_s = latency_ms / 1000
    print(json.dumps({"direct": direct, "proxy": proxy.url}), flush=True)
    cpu_at_reset = time.process_time()
    for line in sys.stdin:  # "reset" | "stats" | "latency <ms>" | "stop"
        command, *argument = line.split()
        if command == "reset":
            proxy.requests.clear()
            proxy.response_bytes = 0
            cpu_at_reset = time.process_time()
            print("{}", flush=True)
        elif command == "stats":
            gets = sum(method == "GET" for method, _ in proxy.requests)
            stats = {
                "get_requests": gets,
                "other_requests": len(proxy.requests) - gets,
                "bytes": proxy.response_bytes,
                "server_cpu_s": round(time.process_time() - cpu_at_reset, 2),  # moto's and the proxy's threads
            }
            print(json.dumps(stats), flush=True)
        elif command == "latency":
            proxy.latency_s = float(argument[0]) / 1000
            print("{}", flush=True)
        else:
            break
    proxy.close()
    server.stop()


class Server:
    """The serve() subprocess, driven over its stdin and stdout."""

    def __init__(self, latency_ms: float, cpus: set[int] | None = None):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--latency-ms", str(latency_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=None if cpus is None else (lambda: os.sched_setaffinity(0, cpus)),
        )
        self.urls = json.loads(self.process.stdout.readline())

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.write("stop\n")
        self.process.stdin.close()
        self.process.wait(timeout=60)


def measure(path, args, storage_options=None, server: Server | None = None) -> dict:
    from scvi_scale import SCVI

    started = time.perf_counter()
    SCVI.setup_zarr(path, batch_key="batch", storage_options=storage_options)
    setup_s = time.perf_counter() - started
    model = SCVI(path)
    costs = {}
    if server is not None:
        server.ask("reset")
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, seed=0)
    if server is not None:
        costs["train"] = server.ask("stats")
        server.ask("reset")
    started = time.perf_counter()
    model.get_latent_representation()
    latent_seconds = time.perf_counter() - started
    if server is not None:
        costs["latent"] = server.ask("stats")
    result = {
        "setup_s": round(setup_s, 2),
        "train": model.run_info["train_cells_per_second"],
        "latent": round(model.store.n_obs / latent_seconds, 1),
    }
    if costs:
        per = 1e6 / (args.epochs * model.store.n_obs)
        train = costs["train"]
        result["requests_per_epoch_per_million_cells"] = round((train["get_requests"] + train["other_requests"]) * per)
        result["get_requests_per_epoch_per_million_cells"] = round(train["get_requests"] * per)
        result["get_bytes_per_epoch_per_million_cells"] = round(train["bytes"] * per)
        result["latent_get_requests_per_million_cells"] = round(
            costs["latent"]["get_requests"] * 1e6 / model.store.n_obs
        )
        result["server_cpu_s"] = {name: cost["server_cpu_s"] for name, cost in costs.items()}
    return result


def cpu_list(text: str) -> set[int]:
    """{0, 1, 4, 5} for "0-1,4,5" (Linux's CPU list syntax)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/scvi-scale-bench"))
    parser.add_argument("--client-cpus", type=cpu_list, help="cores training and the latent run on, e.g. 0-1")
    parser.add_argument("--server-cpus", type=cpu_list, help="cores of the S3 server and the proxy, e.g. 2-7")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.latency_ms)
        return

    os.environ.setdefault("SCVI_SCALE_PROGRESS", "0")
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)  # before torch starts its threads
    import torch

    from scvi_scale.datasets import synthetic_atlas

    local = args.data_dir / f"cloud-{args.cells}x{args.genes}.zarr"
    if not local.exists():
        synthetic_atlas(local, n_cells=args.cells, n_genes=args.genes, n_batches=4)
    server = Server(args.latency_ms, args.server_cpus)
    try:
        import s3fs

        direct = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=server.urls["direct"])
        direct.mkdir(BUCKET)
        direct.put(str(local), f"{BUCKET}/{local.name}", recursive=True)
        url = f"s3://{BUCKET}/{local.name}"
        options = {"key": KEY, "secret": SECRET, "endpoint_url": server.urls["proxy"]}
        measure(local, args)  # warm-up
        results = {"local": measure(local, args)}
        server.ask("latency 0")
        results["s3_no_latency"] = measure(url, args, options, server)
        server.ask(f"latency {args.latency_ms}")
        results["s3"] = measure(url, args, options, server)
    finally:
        server.close()
    results["ratio"] = {name: round(results["s3"][name] / results["local"][name], 3) for name in ("train", "latent")}
    results["latency_hidden"] = {
        name: round(results["s3"][name] / results["s3_no_latency"][name], 3) for name in ("train", "latent")
    }
    results["setting"] = {
        "cells": args.cells,
        "genes": args.genes,
        "latency_ms": args.latency_ms,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "client_cpus": sorted(os.sched_getaffinity(0)),
        "server_cpus": sorted(args.server_cpus) if args.server_cpus else "shared",
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
