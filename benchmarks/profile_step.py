"""Where one training step's time goes: scVI's default VAE (ZINB, 128 hidden, 10 latent, batch as covariate) on
real minibatches of a synthetic store, loss + backward + fused Adam, at 1 and 2 torch threads.

    .venv/bin/python benchmarks/profile_step.py [--cells 20000] [--batch-size 128] [--threads 1 2] [--steps 40]
        [--counts dense|csr] [--data-dir /tmp/scvi-scale-bench] [--trace trace.json]

The minibatches come from `BlockShuffleSampler` on `synthetic_atlas(cells)` (2000 genes, ~10% non-zero) and are
collected first, so the step table holds compute only; the loader's cost to the training thread (waiting on the
queue, making tensors) is timed on its own, stepping as `train.fit` does. `--counts csr` hands the module the CSR
arrays alone (`x_csr`), `dense` the dense x (what `train.fit` passes today).

Step time: the median over --steps steps (after 10 warm-up steps that also trigger torch.compile), without the
profiler. Shares: torch.profiler over the same steps; each top-level event (a forward op, the autograd engine's
evaluation of one backward node, an optimizer call) is put in a category by its name and its operands' shapes
(B cells, G genes, H hidden units), and "python, autograd engine" is the step's wall time outside any op. The
profiler adds its own overhead per op, so shares are of the profiled time, scaled to the unprofiled median.

FLOPs of one step (multiply-adds count 2), printed with the table: the encoder's first layer 2 B G H forward and
2 B G H for its weight gradient (x needs no gradient; with --counts csr and the C kernel of kernels/csr_linear.py,
2 nnz H each), each decoder head (scale; dropout for ZINB) 2 B G H forward and 4 B G H backward.

Each row also gives its floor: the larger of the part's FLOPs at the rate of a (B, H) @ (H, G) float32 product and
its bytes (`floor_work`) at the bandwidth of a 256 MiB copy (main memory), both measured in the same run at the same
thread count. Parts whose data stay in cache (the optimizer's ~3 MB) can beat the bandwidth floor; the backward
products' shapes can beat the forward product's rate.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

CATEGORIES = (
    "encoder first layer, forward",
    "encoder first layer, weight gradient",
    "encoder input (log1p, CSR checks)",
    "decoder heads, forward products",
    "decoder heads, backward products",
    "softmax, forward and backward",
    "likelihood elementwise, forward",
    "likelihood elementwise, backward",
    "small layers (BN, ReLU, dropout, 128-wide linears), KL, loss",
    "optimizer (fused Adam, zero_grad)",
    "python, autograd engine",
)


def is_product(category: str) -> bool:
    """The categories whose time is the G-wide matrix products (the rate line's denominator)."""
    return "product" in category or "first layer," in category


def as_tensors(minibatch: dict, counts: str) -> dict:
    """The module's inputs from a sampler minibatch: dense x, or the CSR arrays alone."""
    tensors = {
        key: torch.from_numpy(np.ascontiguousarray(minibatch[key])) for key in ("batch", "labels") if key in minibatch
    }
    if counts == "csr":
        tensors["x_csr"] = tuple(torch.from_numpy(a) for a in minibatch["x_csr"])
    else:
        tensors["x"] = torch.from_numpy(minibatch["x"])
    return tensors


def setup(store: Path, batch_size: int, counts: str, seed: int = 0):
    """(module, optimizer, sampler) as SCVI.train builds them."""
    from scvi_scale import SCVI, settings
    from scvi_scale.sampler import BlockShuffleSampler

    settings.seed = seed  # the initial weights
    SCVI.setup_zarr(store, batch_key="batch")
    model = SCVI(store)
    torch.manual_seed(seed)
    sampler = BlockShuffleSampler(
        model.store, batch_size=batch_size, obs_arrays=model.obs_arrays, seed=seed, return_csr=counts == "csr"
    )
    module = model.module
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-6, fused=True)
    module.train()
    return module, optimizer, sampler


def step(module, optimizer, tensors: dict, kl_weight: float = 0.5) -> torch.Tensor:
    """One optimizer step as train.fit takes it (no host sync here: the loss is returned, not read)."""
    losses = module.loss(tensors, kl_weight)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return losses["loss"].detach()


def collect(sampler, n: int, counts: str) -> list[dict]:
    batches = []
    for minibatch in sampler:
        batches.append(as_tensors(minibatch, counts))
        if len(batches) == n:
            return batches
    raise ValueError(f"the store gives fewer than {n} minibatches per epoch")


def step_times(module, optimizer, batches: list[dict]) -> list[float]:
    times = []
    for tensors in batches:
        start = time.perf_counter()
        step(module, optimizer, tensors)
        times.append(time.perf_counter() - start)
    return times


def loader_seconds_per_step(module, optimizer, sampler, n_steps: int, counts: str) -> float:
    """Time the training thread spends on the loader per step: waiting for the next minibatch and making tensors,
    while it steps (the reader threads compete with the step for the cores, as in train.fit)."""
    waited = 0.0
    iterator = iter(sampler)
    for _ in range(n_steps):
        start = time.perf_counter()
        minibatch = next(iterator, None)
        if minibatch is None:  # the epoch ended: the next one starts
            iterator = iter(sampler)
            minibatch = next(iterator)
        tensors = as_tensors(minibatch, counts)
        waited += time.perf_counter() - start
        step(module, optimizer, tensors)
    return waited / n_steps


# ----------------------------------------------------------------------------------------- classifying events


def _root(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
    return event


def _shapes(event) -> list[tuple]:
    return [tuple(shape) for shape in (event.input_shapes or []) if shape]


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _product_category(shapes: list[tuple], n_genes: int, backward: bool) -> str | None:
    """The G-wide product an mm / addmm is, from its two matrix operands a @ b (an addmm's bias comes first):
    forward, the encoder's first layer is x (B, G) @ W^T (G, H) and a head h (B, H) @ W^T (H, G); backward
    (autograd keeps each weight gradient in the weight's layout), the encoder's is g^T (H, B) @ x (B, G), a head's
    dS^T (G, B) @ h (B, H) and its d hidden dS (B, G) @ W (G, H). (G also stands for 2G: both heads in one.)"""
    matrices = [s for s in shapes if len(s) == 2][-2:]
    if len(matrices) != 2:
        return None
    (a0, a1), (b0, b1) = matrices
    wide = (n_genes, 2 * n_genes)
    if backward:
        if a0 in wide or a1 in wide:
            return "decoder heads, backward products"
        return "encoder first layer, weight gradient" if b1 in wide else None
    if b0 in wide:
        return "encoder first layer, forward"
    return "decoder heads, forward products" if b1 in wide else None


PRODUCTS = (
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::_sparse_mm",
    "aten::_sparse_addmm",
    "aten::_sparse_csr_mm",
)
# The likelihood's autograd Functions hold the heads' products and the softmax: their children are split out.
LIKELIHOOD_FUNCTIONS = ("DecoderLogLikelihood", "CountLogLikelihood")


def _categorize(event, n_genes: int, backward: bool) -> str:
    node = event.name.removeprefix("autograd::engine::evaluate_function: ")
    if node.startswith("Optimizer."):
        return "optimizer (fused Adam, zero_grad)"
    if "softmax" in node.lower():
        return "softmax, forward and backward"
    if any(function in node for function in LIKELIHOOD_FUNCTIONS):
        return "likelihood elementwise, backward" if backward else "likelihood elementwise, forward"
    if node == "aten::log1p" or "sparse_csr" in node or "_validate" in node:
        return "encoder input (log1p, CSR checks)"
    if "FirstLayer" in node or "CsrLinear" in node:
        return "encoder first layer, weight gradient" if backward else "encoder first layer, forward"
    for product in (e for e in [event, *_descendants(event)] if e.name in PRODUCTS):
        found = _product_category(_shapes(product), n_genes, backward)
        if found:
            return found
    return "small layers (BN, ReLU, dropout, 128-wide linears), KL, loss"


def _attribute(event, n_genes: int, backward: bool, totals: dict) -> None:
    """Adds event's time to its category; inside a likelihood Function, the products and the softmax are
    attributed on their own and the rest (the elementwise passes) to the Function."""
    category = _categorize(event, n_genes, backward)
    if not category.startswith("likelihood"):
        totals[category] += event.time_range.elapsed_us()
        return
    inner = 0.0
    for child in event.cpu_children:
        child_category = _categorize(child, n_genes, backward)
        if child_category.startswith(("decoder heads", "softmax", "likelihood")):
            if child_category.startswith("likelihood"):  # the Function's own event inside the engine's node
                _attribute(child, n_genes, backward, totals)
            else:
                totals[child_category] += child.time_range.elapsed_us()
            inner += child.time_range.elapsed_us()
    totals[category] += event.time_range.elapsed_us() - inner


def profile_shares(module, optimizer, batches: list[dict], n_genes: int, trace: str | None):
    """{category: share of the profiled step time} over the given steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        starts, ends = [], []
        for tensors in batches:
            starts.append(time.perf_counter_ns())
            step(module, optimizer, tensors)
            ends.append(time.perf_counter_ns())
    if trace:
        prof.export_chrome_trace(trace)
    totals: dict[str, float] = defaultdict(float)
    covered = 0.0
    for event in prof.events():
        if event.cpu_parent is not None or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        _attribute(event, n_genes, event.name.startswith("autograd::engine::evaluate_function: "), totals)
        covered += event.time_range.elapsed_us()
    wall_us = sum(end - start for start, end in zip(starts, ends)) / 1e3
    totals["python, autograd engine"] += max(0.0, wall_us - covered)
    return {category: totals.get(category, 0.0) / wall_us for category in CATEGORIES}


def flops(batch_size: int, n_genes: int, n_hidden: int, first_layer_entries: int, zinb: bool = True) -> dict:
    """FLOPs of the G-wide products of one step. first_layer_entries: the entries of x the first layer multiplies,
    B G for the dense product, nnz for the C kernel on CSR (kernels/csr_linear.py)."""
    product = 2 * batch_size * n_genes * n_hidden
    heads = 1 + int(zinb)
    return {
        "encoder first layer (forward + weight gradient)": 2 * 2 * first_layer_entries * n_hidden,
        "decoder heads (forward + both gradients)": 3 * heads * product,
    }


def floor_work(batch_size: int, n_genes: int, n_hidden: int, first_layer_entries: int, n_parameters: int) -> dict:
    """{category: (FLOPs, bytes)}: the least arithmetic and memory traffic each part of a ZINB step needs (float32;
    a B x G array read or written once is 4 B G bytes, a G x H weight 4 G H). The elementwise likelihood's floor is
    its traffic: p and the logits read, two B x G gradients written (its logarithms are arithmetic too, not counted
    here); the optimizer's: fused Adam reads parameter, gradient and two moments and writes three back."""
    bg, gh, bh = 4 * batch_size * n_genes, 4 * n_genes * n_hidden, 4 * batch_size * n_hidden
    first = 2 * first_layer_entries * n_hidden
    entries_bytes = 12 * first_layer_entries  # value and column per stored entry (CSR), or x's dense bytes at most
    heads = 2
    return {
        "encoder first layer, forward": (first, gh + entries_bytes + bh),
        "encoder first layer, weight gradient": (first, gh + entries_bytes + bh),
        "encoder input (log1p, CSR checks)": (0, 2 * entries_bytes),
        "decoder heads, forward products": (heads * 2 * batch_size * n_genes * n_hidden, heads * (gh + bg)),
        "decoder heads, backward products": (heads * 4 * batch_size * n_genes * n_hidden, heads * (2 * gh + bg)),
        "softmax, forward and backward": (0, 4 * bg),
        "likelihood elementwise, forward": (0, 4 * bg),
        "likelihood elementwise, backward": (0, 3 * bg),
        "small layers (BN, ReLU, dropout, 128-wide linears), KL, loss": (0, 0),
        "optimizer (fused Adam, zero_grad)": (0, 7 * 4 * n_parameters),
        "python, autograd engine": (0, 0),
    }


def machine_rates(batch_size: int, n_genes: int, n_hidden: int, repeats: int = 20) -> tuple[float, float]:
    """(FLOP/s of a float32 (B, H) @ (H, G) product, bytes/s of copying a 256 MiB float32 array), at the thread
    count in use: the best of `repeats` runs each, measured in this run beside the step."""
    hidden, weight = torch.randn(batch_size, n_hidden), torch.randn(n_hidden, n_genes)
    out = torch.empty(batch_size, n_genes)
    best_mm = min(_seconds(lambda: torch.mm(hidden, weight, out=out)) for _ in range(repeats))
    source = torch.ones(1 << 26)
    target = torch.empty_like(source)
    best_copy = min(_seconds(lambda: target.copy_(source)) for _ in range(max(3, repeats // 4)))
    return 2 * batch_size * n_hidden * n_genes / best_mm, 2 * source.numel() * 4 / best_copy


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--counts", choices=("dense", "csr"), default="dense")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/scvi-scale-bench"))
    parser.add_argument("--trace", help="write a Chrome trace of the profiled steps (last thread count) here")
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    from train import atlas  # the cached synthetic store benchmarks/train.py uses

    store = atlas(args.data_dir, args.cells)

    module, optimizer, sampler = setup(store, args.batch_size, args.counts)
    warmup = 10
    batches = collect(sampler, warmup + args.steps, args.counts)
    n_genes, n_hidden = module.n_input, module.decoder.px_scale_decoder.weight.shape[1]
    first = batches[0]
    nnz = first["x_csr"][2].numel() if "x_csr" in first else int((first["x"] > 0).sum())
    density = nnz / (args.batch_size * n_genes)
    from scvi_scale.kernels import csr_linear

    sparse_first_layer = args.counts == "csr" and csr_linear.ready_for(torch.device("cpu"), torch.float32)
    first_layer_entries = nnz if sparse_first_layer else args.batch_size * n_genes
    work = flops(args.batch_size, n_genes, n_hidden, first_layer_entries)
    n_parameters = sum(p.numel() for p in module.parameters() if p.requires_grad)
    floors = floor_work(args.batch_size, n_genes, n_hidden, first_layer_entries, n_parameters)
    print(
        f"torch {torch.__version__}; B={args.batch_size}, G={n_genes}, H={n_hidden}, ZINB, {density:.1%} non-zero, "
        f"counts given as {args.counts}"
    )
    print(
        "FLOPs per step in the G-wide products: "
        + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in work.items())
        + f"; total {sum(work.values()) / 1e6:.0f} MFLOP"
    )

    results, rates = {}, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        step_times(module, optimizer, batches[:warmup])
        median = statistics.median(step_times(module, optimizer, batches[warmup:]))
        shares = profile_shares(module, optimizer, batches[warmup:], n_genes, args.trace)
        loader = loader_seconds_per_step(module, optimizer, sampler, args.steps, args.counts)
        rates[threads] = machine_rates(args.batch_size, n_genes, n_hidden)
        results[threads] = (median, shares, loader)

    print(
        "Machine rates in this run (best of repeats): "
        + "; ".join(
            f"{t} thread(s): (B, H) @ (H, G) {gemm / 1e9:.0f} GFLOP/s, 256 MiB copy {bandwidth / 1e9:.1f} GB/s"
            for t, (gemm, bandwidth) in rates.items()
        )
    )
    print(
        "Floor of a part = the larger of its FLOPs / the product's rate and its bytes / the copy's bandwidth "
        "(floor_work; "
        f"first layer {'on CSR, the C kernel' if sparse_first_layer else 'dense'})"
    )
    header = " | ".join(f"{t} thread{'s' * (t > 1)}: ms (share), floor ms" for t in args.threads)
    print(f"\n| part of the step | {header} |\n|---|" + "---|" * len(args.threads))
    for category in CATEGORIES:
        category_flops, category_bytes = floors[category]
        cells = " | ".join(
            f"{1e3 * median * shares[category]:.2f} ({shares[category]:.0%}), "
            f"{1e3 * max(category_flops / rates[t][0], category_bytes / rates[t][1]):.3f}"
            for t, (median, shares, _) in results.items()
        )
        print(f"| {category} | {cells} |")
    print(
        "| **floor of the step (sum)** | "
        + " | ".join(
            f"**{1e3 * sum(max(f / rates[t][0], b / rates[t][1]) for f, b in floors.values()):.2f}**" for t in results
        )
        + " |"
    )
    print(
        "| **step (median, unprofiled)** | " + " | ".join(f"**{1e3 * m:.2f}**" for m, _, _ in results.values()) + " |"
    )
    print(
        "| loader, on the training thread (beside the step) | "
        + " | ".join(f"{1e3 * loader:.2f}" for _, _, loader in results.values())
        + " |"
    )
    print(
        "| cells/s of the step alone | "
        + " | ".join(f"{args.batch_size / m:,.0f}" for m, _, _ in results.values())
        + " |"
    )
    print(
        "| G-wide product rate, GFLOP/s (products' FLOPs / their time) | "
        + " | ".join(
            f"{sum(work.values()) / (m * sum(s[c] for c in CATEGORIES if is_product(c))) / 1e9:.0f}"
            for m, s, _ in results.values()
        )
        + " |"
    )


if __name__ == "__main__":
    main()
