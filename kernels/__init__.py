"""The fused ops of scVI's generative model, and the one place that chooses how they run.

    count_log_likelihood(x, mu, theta=None, zi_logits=None, likelihood="zinb")                      -> (B,)
    decoder_log_likelihood(hidden, scale_weight, scale_bias, log_library, x, theta=None,
                           dropout_weight=None, dropout_bias=None, likelihood="zinb")             -> (B,)
    decoder_px_scale(hidden, scale_weight, scale_bias, gene_chunk=None)                             -> (B, G)

Backend (`scvi_scale.settings.kernel_backend`, environment variable SCVI_SCALE_KERNELS):
    "auto"    CUDA tensors run the fused Triton kernels (count_likelihood.py, decoder_likelihood.py);
              CPU tensors run the PyTorch path (torch_ops.py) with the likelihood's terms from the C kernel
              (native.py, built from the model's set-up on, in a thread) where it builds, else torch_ops' own
              (torch.compile'd).
    "triton"  always Triton; on CPU tensors this works only under TRITON_INTERPRET=1 (how the tests run it),
              which must be set before the kernel modules are first imported.
    "native"  the PyTorch path with the C kernel's terms; an error where it cannot be built. float64 inputs run
              torch_ops' own terms (the C kernel is float32).
    "torch"   always the PyTorch path with torch_ops' own terms.
The Triton modules are imported on first use, so CPU-only use never imports Triton. The backend chosen is logged
once per backend on the "scvi_scale.kernels" logger.

Inputs of any floating dtype are computed in float32 (float64 when any input is float64); results and gradients
come back in that dtype.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import torch
from scvi_scale.kernels import csr_linear, native, torch_ops
from scvi_scale.kernels.torch_ops import LIKELIHOODS

from scvi_scale.settings import settings

__all__ = ["LIKELIHOODS", "count_log_likelihood", "decoder_log_likelihood", "decoder_px_scale"]

logger = logging.getLogger("scvi_scale.kernels")
_backends_logged: set[str] = set()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def build_native_in_background() -> None:
    """Starts building the C kernel (native.py) in a thread, where settings.kernel_backend may use it ("auto" or
    "native"): the model's set-up calls this so that the compiler runs while the data is opened (a cold cache's
    build is not paid on the first step). Does nothing once built or started."""
    if settings.kernel_backend in ("auto", "native"):
        native.build_in_background(csr_linear.ready)


def _choose_backend(device: torch.device, dtype: torch.dtype) -> str:
    """ "triton", "native" or "torch" for tensors of `dtype` on `device`, following settings.kernel_backend; logs
    each choice once."""
    requested = settings.kernel_backend
    if requested == "torch":
        backend = "torch"
    elif requested == "native":
        if device.type != "cpu":
            raise RuntimeError(f"kernel_backend='native' got {device.type} tensors: the C kernel runs on the CPU")
        if not torch_ops.native_ready():
            raise RuntimeError(
                "kernel_backend='native' but the C kernel could not be built (see the 'scvi_scale.kernels' log for why)"
            )
        backend = "native" if dtype == torch.float32 else "torch"
    elif requested == "triton":
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"kernel_backend='triton' got {device.type} tensors: Triton runs on CUDA tensors, or on CPU tensors "
                "only with TRITON_INTERPRET=1 set before scvi_scale.kernels' Triton modules are imported"
            )
        if not _triton_importable():
            raise RuntimeError("kernel_backend='triton' but the triton package is not installed")
        backend = "triton"
    elif device.type == "cuda" and _triton_importable():
        backend = "triton"
    elif device.type == "cpu" and dtype == torch.float32 and torch_ops.native_ready():
        backend = "native"
    else:
        backend = "torch"
    if backend not in _backends_logged:
        _backends_logged.add(backend)
        logger.info(
            "fused ops run on the %s backend (settings.kernel_backend=%r, %s tensors)", backend, requested, device.type
        )
    return backend


def _triton_module(name: str):
    return importlib.import_module(f"scvi_scale.kernels.{name}")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x as a dense tensor: the Triton kernels read counts dense."""
    return x.to_dense() if x.layout == torch.sparse_csr else x


def _check_2d(name: str, tensor: torch.Tensor, shape: tuple[int, int]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")


def _check_likelihood_inputs(likelihood: str, theta, zi_name: str, zi_given: bool, n_cells: int, n_genes: int):
    """Checks the likelihood name, that theta and the zero-inflation input come exactly when needed, and theta's
    shape."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood={likelihood!r}: expected one of {LIKELIHOODS}")
    if likelihood == "poisson" and theta is not None:
        raise ValueError("likelihood='poisson' takes no theta; pass theta=None")
    if likelihood != "poisson":
        if theta is None:
            raise ValueError(f"likelihood={likelihood!r} needs theta, the inverse dispersion")
        if tuple(theta.shape) not in ((n_genes,), (n_cells, n_genes)):
            raise ValueError(
                f"theta has shape {tuple(theta.shape)}, expected ({n_genes},) per gene or ({n_cells}, {n_genes})"
            )
    if likelihood == "zinb" and not zi_given:
        raise ValueError(f"likelihood='zinb' needs {zi_name}")
    if likelihood != "zinb" and zi_given:
        raise ValueError(f"{zi_name} is used by likelihood='zinb' only, got likelihood={likelihood!r}; pass None")


def _check_devices(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"inputs are on different devices: {devices}")
    return next(iter(devices.values()))


def count_log_likelihood(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    zi_logits: torch.Tensor | None = None,
    likelihood: str = "zinb",
) -> torch.Tensor:
    """Per-cell log-likelihood of counts, summed over genes.

    x: (B, G) counts (float, >= 0), dense or a sparse CSR tensor (the PyTorch path reads only its non-zeros);
    mu: (B, G) means (> 0); theta: inverse dispersion (> 0), (G,) or (B, G),
    for "zinb" and "nb" only; zi_logits: (B, G) logits of the zero-inflation probability, "zinb" only;
    likelihood: "zinb", "nb" or "poisson". Returns (B,), the sum over genes of log p(x); differentiable in mu,
    theta and zi_logits. Values are not checked (that would cost a device sync per call): negative counts or
    non-positive mu or theta give NaN or -inf.
    """
    if x.dim() != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (cells, genes)")
    n_cells, n_genes = x.shape
    _check_2d("mu", mu, (n_cells, n_genes))
    _check_likelihood_inputs(likelihood, theta, "zi_logits", zi_logits is not None, n_cells, n_genes)
    if zi_logits is not None:
        _check_2d("zi_logits", zi_logits, (n_cells, n_genes))
    device = _check_devices(x=x, mu=mu, theta=theta, zi_logits=zi_logits)
    dtype = _compute_dtype(x, mu, theta, zi_logits)
    x, mu, theta, zi_logits = (None if t is None else t.to(dtype) for t in (x, mu, theta, zi_logits))  # type: ignore[assignment]
    backend = _choose_backend(device, dtype)
    if backend == "triton" and x.numel() > 0:  # (an empty grid is no launch: PyTorch answers)
        return _triton_module("count_likelihood").count_log_likelihood(_dense(x), mu, theta, zi_logits, likelihood)
    return torch_ops.count_log_likelihood(x, mu, theta, zi_logits, likelihood, native=backend == "native")


def decoder_log_likelihood(
    hidden: torch.Tensor,
    scale_weight: torch.Tensor,
    scale_bias: torch.Tensor,
    log_library: torch.Tensor,
    x: torch.Tensor,
    theta: torch.Tensor | None = None,
    dropout_weight: torch.Tensor | None = None,
    dropout_bias: torch.Tensor | None = None,
    likelihood: str = "zinb",
) -> torch.Tensor:
    """Per-cell log-likelihood of counts under scVI's decoder output, from its last hidden layer.

    hidden: (B, H); scale_weight: (G, H), scale_bias: (G,) (nn.Linear layout) give
        px_scale = softmax(hidden @ scale_weight.T + scale_bias) over genes,  px_rate = exp(log_library) * px_scale;
    log_library: (B,) or (B, 1), natural log of the library size; x: (B, G) counts, dense or sparse CSR;
    theta: (G,) or (B, G),
    "zinb"/"nb" only; dropout_weight: (G, H), dropout_bias: (G,) give the zero-inflation logits
    hidden @ dropout_weight.T + dropout_bias, "zinb" only. Returns (B,), the sum over genes of log p(x);
    differentiable in hidden, the weights and biases, theta and log_library. On CUDA no B x G tensor is made.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}, expected (cells, hidden units)")
    if x.dim() != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (cells, genes)")
    n_cells, n_hidden = hidden.shape
    n_genes = x.shape[1]
    _check_2d("x", x, (n_cells, n_genes))
    _check_2d("scale_weight", scale_weight, (n_genes, n_hidden))
    if tuple(scale_bias.shape) != (n_genes,):
        raise ValueError(f"scale_bias has shape {tuple(scale_bias.shape)}, expected ({n_genes},)")
    if tuple(log_library.shape) not in ((n_cells,), (n_cells, 1)):
        raise ValueError(f"log_library has shape {tuple(log_library.shape)}, expected ({n_cells},) or ({n_cells}, 1)")
    if (dropout_weight is None) != (dropout_bias is None):
        raise ValueError("dropout_weight and dropout_bias come together: pass both or neither")
    _check_likelihood_inputs(
        likelihood, theta, "dropout_weight and dropout_bias", dropout_weight is not None, n_cells, n_genes
    )
    if dropout_weight is not None:
        _check_2d("dropout_weight", dropout_weight, (n_genes, n_hidden))
        if dropout_bias is None:
            raise ValueError("dropout_weight needs dropout_bias")
        if tuple(dropout_bias.shape) != (n_genes,):
            raise ValueError(f"dropout_bias has shape {tuple(dropout_bias.shape)}, expected ({n_genes},)")
    inputs = dict(
        hidden=hidden,
        scale_weight=scale_weight,
        scale_bias=scale_bias,
        log_library=log_library.reshape(n_cells),
        x=x,
        theta=theta,
        dropout_weight=dropout_weight,
        dropout_bias=dropout_bias,
    )
    device = _check_devices(**inputs)
    dtype = _compute_dtype(*inputs.values())
    inputs = {name: None if t is None else t.to(dtype) for name, t in inputs.items()}
    backend = _choose_backend(device, dtype)
    if backend == "triton" and x.numel() > 0:
        inputs["x"] = _dense(inputs["x"])  # type: ignore[arg-type]  # x is a tensor
        return _triton_module("decoder_likelihood").decoder_log_likelihood(**inputs, likelihood=likelihood)
    return torch_ops.decoder_log_likelihood(**inputs, likelihood=likelihood, native=backend == "native")


def decoder_px_scale(
    hidden: torch.Tensor, scale_weight: torch.Tensor, scale_bias: torch.Tensor, gene_chunk: int | None = None
) -> torch.Tensor:
    """px_scale = softmax(hidden @ scale_weight.T + scale_bias) over genes, for inference (no autograd).

    hidden: (B, H); scale_weight: (G, H); scale_bias: (G,). Returns (B, G) float32, each row summing to 1.
    gene_chunk bounds the PyTorch path's temporaries to B x gene_chunk; the Triton kernel makes none and
    ignores it.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}, expected (cells, hidden units)")
    if scale_weight.dim() != 2 or scale_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"scale_weight has shape {tuple(scale_weight.shape)}, expected (genes, {hidden.shape[1]})")
    n_genes = scale_weight.shape[0]
    if tuple(scale_bias.shape) != (n_genes,):
        raise ValueError(f"scale_bias has shape {tuple(scale_bias.shape)}, expected ({n_genes},)")
    if gene_chunk is not None and gene_chunk < 1:
        raise ValueError(f"gene_chunk={gene_chunk}: expected a positive number of genes or None")
    device = _check_devices(hidden=hidden, scale_weight=scale_weight, scale_bias=scale_bias)
    if _choose_backend(device, hidden.dtype) == "triton" and hidden.shape[0] * n_genes > 0:
        return _triton_module("decoder_likelihood").decoder_px_scale(hidden, scale_weight, scale_bias)
    return torch_ops.decoder_px_scale(hidden, scale_weight, scale_bias, gene_chunk)
