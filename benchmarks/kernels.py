"""Benchmark of scvi_scale.kernels: the fused ops against the unfused PyTorch code they replace, time and memory.

    .venv/bin/python benchmarks/kernels.py [--cells 1024] [--genes 2000] [--hidden 128] [--memory-genes 33538]
        [--threads 1] [--kept 0.25]

Paths, each timed for forward + backward (the minimum over --repeats runs after a warm-up):
    unfused     the textbook dense PyTorch forms (count_likelihood.reference_count_log_likelihood,
                decoder_likelihood.reference_decoder_log_likelihood): three lgammas per entry, autograd,
                B x G temporaries
    torch       scvi_scale.kernels' PyTorch path (torch_ops.py): sparse-aware, analytic gradients; eager, and with
                torch.compile as it runs from torch_ops.COMPILE_MIN_ENTRIES entries on
    native      the same path with the likelihood's terms from the C kernel (native.py), the CPU default
    triton      the fused Triton kernels (CUDA only)
Memory at --cells x --memory-genes, the decoder op: on CUDA the peak allocated during forward + backward above what
the inputs hold; on the CPU the bytes of the tensors each path saves for its backward (the inputs' own storage
excluded), which is what training keeps alive from forward to backward; the Triton path is included on the CPU when
TRITON_INTERPRET=1 is set (its forward then runs in the interpreter, ~1 minute at this size).
On CUDA, each time is set against two floors, written with B cells, G genes, H hidden units, 4-byte floats and
z = 1 for ZINB (the dropout head), 0 otherwise:
    bytes floor  count:   4 B G (3 + 2 z)   (x, mu, z read; d mu, d z written; theta per gene is negligible)
                 decoder: 4 (B G + 2 B H + 2 G H (1 + z))   (x read once; hidden and the weights read, their
                          gradients written)
    FLOP floor   decoder: 2 B G H (1 + z) x 3   (logits forward; d hidden and d W backward)
    time floor   bytes floor / copy bandwidth and FLOP floor / fp32 matmul rate, both measured on the device
                 (a device-to-device copy; torch.mm with TF32 off, the precision the kernels use)
    achieved     bytes floor / measured time: the bandwidth the op would need if it moved only the floor's bytes
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from contextlib import contextmanager

import torch
from scvi_scale.kernels import torch_ops
from scvi_scale.kernels.count_likelihood import reference_count_log_likelihood
from scvi_scale.kernels.decoder_likelihood import reference_decoder_log_likelihood

PARAMETERS = {
    "count": ("mu", "theta", "zi_logits"),
    "decoder": ("hidden", "scale_weight", "scale_bias", "log_library", "theta", "dropout_weight", "dropout_bias"),
}


def decoder_inputs(n_cells: int, n_genes: int, n_hidden: int, device: str, seed: int = 0, kept: float = 0.1) -> dict:
    """Inputs of decoder_log_likelihood shaped like a trained scVI decoder's: Poisson counts around mu, each kept
    with probability `kept` (0.1 gives ~4% non-zero; 0.25 ~10%, the synthetic atlas's density)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    hidden = normal(n_cells, n_hidden).clamp(min=0)
    scale_weight = normal(n_genes, n_hidden, scale=2 / math.sqrt(n_hidden))
    scale_bias = normal(n_genes)
    log_library = torch.log(n_genes * (0.5 + 2 * torch.rand(n_cells, generator=generator)))
    mu = torch.exp(log_library)[:, None] * torch.softmax(hidden @ scale_weight.T + scale_bias, dim=-1)
    x = torch.poisson(mu, generator=generator) * (torch.rand(n_cells, n_genes, generator=generator) < kept)
    inputs = dict(
        hidden=hidden,
        scale_weight=scale_weight,
        scale_bias=scale_bias,
        log_library=log_library,
        x=x,
        theta=torch.exp(normal(n_genes)),
        dropout_weight=normal(n_genes, n_hidden, scale=2 / math.sqrt(n_hidden)),
        dropout_bias=normal(n_genes, scale=3),
    )
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def count_inputs(decoder: dict) -> dict:
    """Inputs of count_log_likelihood: the decoder's mean and dropout logits, made once."""
    with torch.no_grad():
        log_px = torch.log_softmax(decoder["hidden"] @ decoder["scale_weight"].T + decoder["scale_bias"], dim=-1)
        zi = decoder["hidden"] @ decoder["dropout_weight"].T + decoder["dropout_bias"]
    return dict(
        x=decoder["x"], mu=torch.exp(decoder["log_library"][:, None] + log_px), theta=decoder["theta"], zi_logits=zi
    )


@contextmanager
def compile_threshold(entries: int):
    """Sets torch_ops.COMPILE_MIN_ENTRIES: 0 compiles every call without a size below 2, a huge number keeps the
    path eager."""
    saved = torch_ops.COMPILE_MIN_ENTRIES
    torch_ops.COMPILE_MIN_ENTRIES = entries
    try:
        yield
    finally:
        torch_ops.COMPILE_MIN_ENTRIES = saved


def leaves(inputs: dict, op: str, likelihood: str) -> dict:
    """Fresh autograd leaves of the inputs the likelihood takes (the parameters requiring gradients), None for the
    others (theta for Poisson, the dropout logits or head unless ZINB)."""
    unused = {"zi_logits", "dropout_weight", "dropout_bias"} if likelihood != "zinb" else set()
    if likelihood == "poisson":
        unused.add("theta")
    return {
        name: None if name in unused else t.detach().requires_grad_(name in PARAMETERS[op])
        for name, t in inputs.items()
    }


def forward_backward(function, inputs: dict, op: str, likelihood: str):
    """One training step's worth of the op: the per-cell log-likelihood, summed, and its gradients."""
    function(**leaves(inputs, op, likelihood), likelihood=likelihood).sum().backward()


def seconds(function, inputs, op, likelihood, repeats: int, device: str) -> float:
    forward_backward(function, inputs, op, likelihood)  # warm-up: compilation, caches
    best = math.inf
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward_backward(function, inputs, op, likelihood)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def paths(op: str, device: str, with_triton: bool) -> dict:
    """name -> (function, compile threshold or None) for the op on the device."""
    unfused = reference_count_log_likelihood if op == "count" else reference_decoder_log_likelihood
    ours = torch_ops.count_log_likelihood if op == "count" else torch_ops.decoder_log_likelihood
    found = {"unfused (textbook)": (unfused, None), "torch eager": (ours, 1 << 62), "torch compiled": (ours, 0)}
    if device == "cpu" and torch_ops.native_ready():
        found["native (C)"] = (functools.partial(ours, native=True), None)
    if with_triton:
        from scvi_scale.kernels import count_likelihood, decoder_likelihood

        fused = count_likelihood.count_log_likelihood if op == "count" else decoder_likelihood.decoder_log_likelihood
        found["triton fused"] = (fused, None)
    return found


def floors(op: str, likelihood: str, n_cells: int, n_genes: int, n_hidden: int):
    """(bytes floor, FLOP floor) from the module docstring's formulas."""
    z = 1 if likelihood == "zinb" else 0
    if op == "count":
        return 4 * n_cells * n_genes * (3 + 2 * z), 0
    bytes_floor = 4 * (n_cells * n_genes + 2 * n_cells * n_hidden + 2 * n_genes * n_hidden * (1 + z))
    return bytes_floor, 2 * n_cells * n_genes * n_hidden * (1 + z) * 3


def device_rates(device: str) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, fp32 matmul rate in FLOP/s, TF32 off), measured on the device."""
    source = torch.empty(1 << 28, device=device)  # 1 GiB
    target = torch.empty_like(source)
    a = torch.randn(8192, 8192, device=device)
    torch.backends.cuda.matmul.allow_tf32 = False

    def best(step, n=5):
        step()
        torch.cuda.synchronize()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    bandwidth = 2 * source.numel() * 4 / best(lambda: target.copy_(source))  # read + write
    matmul_rate = 2 * 8192**3 / best(lambda: a @ a)
    return bandwidth, matmul_rate


def saved_bytes(function, inputs: dict, op: str, likelihood: str) -> int:
    """Bytes of the tensors autograd saves for the backward of one forward pass, inputs' storage excluded."""
    arguments = leaves(inputs, op, likelihood)
    input_storages = {t.untyped_storage().data_ptr() for t in arguments.values() if t is not None}
    saved = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in input_storages:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = function(**arguments, likelihood=likelihood)
    return sum(saved.values()) + out.numel() * out.element_size()


def peak_cuda_bytes(function, inputs: dict, op: str, likelihood: str) -> int:
    """Peak CUDA memory allocated during forward + backward above what was allocated before (the inputs)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward(function, inputs, op, likelihood)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1024)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--memory-genes", type=int, default=33538)
    parser.add_argument("--likelihood", default="zinb", choices=("zinb", "nb", "poisson"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--kept", type=float, default=0.1, help="share of the Poisson counts kept (see decoder_inputs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ", no GPU")
    )

    for device in devices:
        if not args.skip_time:
            print_times(device, args)
        if not args.skip_memory:
            print_memory(device, args)


def print_times(device: str, args) -> None:
    decoder = decoder_inputs(args.cells, args.genes, args.hidden, device, kept=args.kept)
    rates = device_rates(device) if device == "cuda" else None
    print(
        f"\n### Time, forward + backward, {device}: B={args.cells} G={args.genes} H={args.hidden} {args.likelihood}, "
        f"{int((decoder['x'] > 0).sum()) / decoder['x'].numel():.0%} nonzero"
    )
    header = "| op | path | time (ms) | vs unfused |"
    if rates:
        header += " achieved (GB/s) | bytes floor (ms) | FLOP floor (ms) |"
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for op, inputs in {"count": count_inputs(decoder), "decoder": decoder}.items():
        unfused_time = None
        for name, (function, threshold) in paths(op, device, with_triton=device == "cuda").items():
            with compile_threshold(torch_ops.COMPILE_MIN_ENTRIES if threshold is None else threshold):
                elapsed = seconds(function, inputs, op, args.likelihood, args.repeats, device)
            unfused_time = unfused_time or elapsed
            row = f"| {op} | {name} | {1e3 * elapsed:.1f} | {unfused_time / elapsed:.2f}x |"
            if rates:
                bytes_floor, flop_floor = floors(op, args.likelihood, args.cells, args.genes, args.hidden)
                row += (
                    f" {bytes_floor / elapsed / 1e9:.0f} | {1e3 * bytes_floor / rates[0]:.2f} |"
                    f" {1e3 * flop_floor / rates[1]:.2f} |"
                )
            print(row)
    if rates:
        print(f"\nmeasured: copy bandwidth {rates[0] / 1e9:.0f} GB/s, fp32 matmul {rates[1] / 1e12:.1f} TFLOP/s")


def print_memory(device: str, args) -> None:
    inputs = decoder_inputs(args.cells, args.memory_genes, args.hidden, device, seed=1, kept=args.kept)
    what = "peak CUDA memory above the inputs" if device == "cuda" else "bytes saved for backward"
    print(
        f"\n### Memory, decoder op, {device}: B={args.cells} G={args.memory_genes} H={args.hidden} "
        f"{args.likelihood}: {what}\n| path | MiB | vs unfused |\n|---|---|---|"
    )
    # The interpreter runs the Triton kernels on the CPU (far too slowly to time), which is enough to see what they
    # keep for the backward. Eager and compiled PyTorch keep the same tensors: only the compiled path is measured.
    with_triton = device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    unfused_bytes = None
    for name, (function, threshold) in paths("decoder", device, with_triton).items():
        if name == "torch eager":
            continue
        measure = peak_cuda_bytes if device == "cuda" else saved_bytes
        with compile_threshold(torch_ops.COMPILE_MIN_ENTRIES if threshold is None else threshold):
            used = measure(function, inputs, "decoder", args.likelihood)
        unfused_bytes = unfused_bytes or used
        print(f"| {name} | {used / 2**20:.3f} | {used / unfused_bytes:.3%} |")


if __name__ == "__main__":
    main()
