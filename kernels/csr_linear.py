"""The encoder's first layer on CSR counts with its weight gradient, in C (csr_linear.c, built by native.py): what
`nn.linear_with_covariates` runs in training where x is sparse.

    csr_linear(crow, cols, values, dense, weight, bias) -> (B, H)
        = [x, dense] @ weight.T + bias, x the CSR matrix (B, S) of (crow (B + 1,), cols (nnz,), values (nnz,)),
        dense (B, D) or None (the one-hot covariates), weight (H, S + D), bias (H,) or None.

The gradients are the weight's and the bias's; x and the dense columns get none (they are data: inputs that
require one are refused). The product walks the stored entries only: 2 nnz H FLOPs forward and as many for
the weight gradient, against 2 B S H each for the dense product that torch's sparse backward does not beat.

`ready()` builds and loads the library once per process and checks it against float64 dense products on a small
input; where it cannot be built (no C compiler) or disagrees, it is False and the caller keeps the dense product.
float32 CPU tensors only (`ready_for`).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import warnings
from pathlib import Path

import torch
from scvi_scale.kernels import native

from scvi_scale.settings import settings

logger = logging.getLogger("scvi_scale.kernels")

SOURCE = Path(__file__).with_name("csr_linear.c")
_state: dict = {}  # "library": the loaded, checked library, or None once tried
_lock = threading.Lock()


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.scvi_csr_to_csc.restype = None
    library.scvi_csr_to_csc.argtypes = [i64, i64, pointer, pointer, pointer, pointer, pointer, pointer]
    for name in ("scvi_csr_linear_forward_f32", "scvi_csr_linear_weight_grad_f32"):
        function = getattr(library, name)
        function.restype = ctypes.c_int
        function.argtypes = [i64, i64, i64, i64, pointer, pointer, pointer, pointer, pointer, pointer, pointer]
    return library


def ready() -> bool:
    """Whether the C kernel is built, loaded and agrees with a float64 dense product (checked once per process)."""
    with _lock:
        if "library" not in _state:
            _state["library"] = None
            try:
                _state["library"] = _load(native.build(source=SOURCE))
            except (RuntimeError, OSError) as error:
                logger.info("native sparse first-layer kernel unavailable (%s); using the dense product", error)
                return False
            mismatch = _mismatch()
            if mismatch:
                logger.warning(
                    "the native sparse first layer disagrees with the dense product (%s); not used", mismatch
                )
                _state["library"] = None
    return _state["library"] is not None


def ready_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether csr_linear runs for tensors of `dtype` on `device`: float32 CPU tensors, settings.kernel_backend
    "auto" or "native" ("torch" keeps torch's products), and the kernel ready()."""
    if device.type != "cpu" or dtype != torch.float32 or settings.kernel_backend not in ("auto", "native"):
        return False
    return ready()


def _mismatch() -> str | None:
    """What of the kernel's output and gradients disagrees with float64 dense products on a small input, or None."""
    generator = torch.Generator().manual_seed(0)
    n_rows, n_sparse, n_dense, n_out = 5, 37, 3, 19
    x = torch.rand(n_rows, n_sparse, generator=generator)
    x = torch.where(x < 0.7, 0.0, x * 5)
    x[2] = 0.0  # an empty row
    with warnings.catch_warnings():  # torch calls its CSR tensors beta; only their index arrays are used here
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        csr = x.to_sparse_csr()
    dense = torch.randn(n_rows, n_dense, generator=generator)
    weight = torch.randn(n_out, n_sparse + n_dense, generator=generator, requires_grad=True)
    bias = torch.randn(n_out, generator=generator, requires_grad=True)
    grad_out = torch.randn(n_rows, n_out, generator=generator)
    out = csr_linear(csr.crow_indices(), csr.col_indices(), csr.values(), dense, weight, bias)
    # d sum(out * grad_out) / d out is grad_out exactly; out.backward(grad_out) would import sympy (~0.3 s, through
    # autograd's shape checks for given gradients), which neither training's scalar loss nor the outputs need
    (out * grad_out).sum().backward()
    inputs = torch.cat([x, dense], dim=1).double()
    want = {
        "output": inputs @ weight.double().t() + bias.double(),
        "weight gradient": grad_out.double().t() @ inputs,
        "bias gradient": grad_out.double().sum(0),
    }
    for name, got in (("output", out), ("weight gradient", weight.grad), ("bias gradient", bias.grad)):
        assert got is not None, "backward ran above: every gradient is set"
        if not torch.allclose(got.double(), want[name], rtol=1e-5, atol=1e-5):
            return f"{name}: largest difference {float((got.double() - want[name]).abs().max()):.3g}"
    return None


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _checked(status: int, n_out: int) -> None:
    if status != 0:
        raise MemoryError(f"the sparse first layer could not allocate a tile of {n_out} hidden units")


class CsrLinear(torch.autograd.Function):
    """[x, dense] @ weight.T + bias for x in CSR; gradients for weight and bias only (see the module docstring)."""

    @staticmethod
    def forward(ctx, crow, cols, values, dense, weight, bias):
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise ValueError("csr_linear gives no gradient for x or the dense columns, but one of them requires it")
        library = _state["library"]
        n_rows, n_out = crow.shape[0] - 1, weight.shape[0]
        n_dense = 0 if dense is None else dense.shape[1]
        n_sparse = weight.shape[1] - n_dense
        crow, cols, values = crow.long().contiguous(), cols.long().contiguous(), values.detach().contiguous()
        # x grouped by column (CSC), shared by the forward and the backward product
        col_ptr = torch.empty(n_sparse + 1, dtype=torch.int64)
        entry_rows = torch.empty(values.shape[0], dtype=torch.int32)
        entry_values = torch.empty(values.shape[0], dtype=torch.float32)
        library.scvi_csr_to_csc(
            n_rows,
            n_sparse,
            crow.data_ptr(),
            cols.data_ptr(),
            values.data_ptr(),
            col_ptr.data_ptr(),
            entry_rows.data_ptr(),
            entry_values.data_ptr(),
        )
        dense = None if dense is None else dense.detach().contiguous()
        out = torch.empty(n_rows, n_out, dtype=torch.float32)
        status = library.scvi_csr_linear_forward_f32(
            n_rows,
            n_sparse,
            n_dense,
            n_out,
            col_ptr.data_ptr(),
            entry_rows.data_ptr(),
            entry_values.data_ptr(),
            _pointer(dense),
            weight.detach().contiguous().data_ptr(),
            _pointer(None if bias is None else bias.detach().contiguous()),
            out.data_ptr(),
        )
        _checked(status, n_out)
        ctx.save_for_backward(col_ptr, entry_rows, entry_values, dense)
        ctx.sizes = (n_rows, n_sparse, n_dense, n_out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        col_ptr, entry_rows, entry_values, dense = ctx.saved_tensors
        n_rows, n_sparse, n_dense, n_out = ctx.sizes
        needs_weight, needs_bias = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        if not (needs_weight or needs_bias):
            return None, None, None, None, None, None
        grad_out = grad_out.contiguous()
        grad_weight = torch.empty(n_out, n_sparse + n_dense, dtype=torch.float32)
        grad_bias = torch.empty(n_out, dtype=torch.float32) if needs_bias else None
        status = _state["library"].scvi_csr_linear_weight_grad_f32(
            n_rows,
            n_sparse,
            n_dense,
            n_out,
            col_ptr.data_ptr(),
            entry_rows.data_ptr(),
            entry_values.data_ptr(),
            _pointer(dense),
            grad_out.data_ptr(),
            grad_weight.data_ptr(),
            _pointer(grad_bias),
        )
        _checked(status, n_out)
        return None, None, None, None, grad_weight if needs_weight else None, grad_bias


def csr_linear(crow, cols, values, dense, weight, bias) -> torch.Tensor:
    """[x, dense] @ weight.T + bias (B, H) for x in CSR; see the module docstring. Needs ready_for(...) to hold."""
    return CsrLinear.apply(crow, cols, values, dense, weight, bias)
