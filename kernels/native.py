"""The count likelihood's terms as a small C kernel (count_terms.c) built on the user's machine: torch_ops.count_terms
at compiled speed without torch.compile's start-up.

torch.compile (inductor) made these terms far faster than eager PyTorch, but compiling them cost tens of seconds
in every fresh process with empty caches (benchmarks/startup.py). The same two loops written in C compile in well
under a second with the system's C compiler and vectorize through glibc's libmvec. The shared library is cached in
the user's cache directory, keyed by the source, the compiler, its flags and the CPU (so a home directory shared by
machines of different CPUs keeps one build per CPU); processes that start at once each build into a file of their
own and rename it into place.

Where no C compiler or libmvec is found (glibc < 2.35, macOS), `library()` is None, and where the built kernel
disagrees with the PyTorch path on a check input (torch_ops.native_ready) it is dropped: the PyTorch path
(torch_ops) runs instead, the reason logged once.

Environment:
    SCVI_SCALE_CACHE_DIR   where built kernels are kept (default $XDG_CACHE_HOME/scvi-scale, else
                           ~/.cache/scvi-scale); an unwritable one falls back to a temporary directory.
    CC                     the C compiler (default: cc, then gcc).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger("scvi_scale.kernels")

SOURCE = Path(__file__).with_name("count_terms.c")
# -ffp-contract=off: no fused multiply-adds, so the same CPU always rounds the formulas as they are written; no
# -ffast-math: the formulas' accuracy depends on IEEE arithmetic. -Wl,-z,defs refuses a library with unresolved
# symbols at build time (a libmvec without log1pf) instead of at the first call.
CFLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fPIC",
    "-shared",
    "-Wl,-z,defs",
)
# GCC only: without these passes GCC keeps each vector logarithm unconditional instead of moving it into the
# branch of a select, where it was evaluated on masked lanes (benchmarks/history/issue-24.md: the non-zero loop).
GCC_FLAGS = ("-fno-tree-sink", "-fno-tree-pre", "-fno-ssa-phiopt")
LIBS = ("-lmvec", "-lm")
LIKELIHOOD_CODES = {"poisson": 0, "nb": 1, "zinb": 2}
THETA_NONE, THETA_PER_GENE, THETA_PER_ENTRY = 0, 1, 2

_state: dict = {}  # "library": the loaded library or None once tried; "checked": compared with torch_ops once
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where built kernels are kept: SCVI_SCALE_CACHE_DIR, else $XDG_CACHE_HOME/scvi-scale, else
    ~/.cache/scvi-scale."""
    if os.environ.get("SCVI_SCALE_CACHE_DIR"):
        return Path(os.environ["SCVI_SCALE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scvi-scale"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def build_key(compiler: str, source: Path = SOURCE) -> str:
    """A digest of everything the built library depends on: the source, the compiler and flags, the CPU."""
    digest = hashlib.sha256(source.read_bytes())
    for part in (
        compiler,
        os.path.realpath(shutil.which(compiler) or compiler),
        " ".join(CFLAGS + GCC_FLAGS + LIBS),
        platform.machine(),
        _cpu_signature(),
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


def build(directory: Path | None = None, source: Path = SOURCE) -> Path:
    """Builds `source` (a C file beside this one: count_terms.c, csr_linear.c) into `directory` (default
    cache_dir()), or finds it built; returns the library's path. Raises RuntimeError with the compiler's message
    when it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc; or set CC)")
    directory = cache_dir() if directory is None else directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-")
        probe.close()
    except OSError:
        directory = Path(tempfile.mkdtemp(prefix="scvi-scale-kernels-"))
    target = directory / f"{source.stem}-{build_key(compiler, source)}.so"
    if target.exists():
        return target
    fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    try:
        for flags in (CFLAGS + GCC_FLAGS, CFLAGS):  # then the portable flags alone (another compiler: clang)
            result = subprocess.run(
                [compiler, *flags, str(source), "-o", partial, *LIBS], capture_output=True, text=True
            )
            if result.returncode == 0:
                break
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(partial, target)  # atomic: a process starting at the same time sees all of it or nothing
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.scvi_count_terms_f32.restype = ctypes.c_int
    library.scvi_count_terms_f32.argtypes = [
        i64,
        i64,
        i64,
        i32,
        pointer,
        pointer,
        pointer,
        i32,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
    ]
    library.scvi_stirlerr_f32.restype = None
    library.scvi_stirlerr_f32.argtypes = [i64, pointer, pointer]
    return library


def library() -> ctypes.CDLL | None:
    """The built kernel library, or None where it cannot be had (the reason logged once). Callers check it against
    the PyTorch path once (torch_ops.native_ready) before using it."""
    with _lock:
        if "library" not in _state:
            _state["library"] = None
            try:
                _state["library"] = _load(build())
            except (RuntimeError, OSError) as error:
                logger.info("native likelihood kernel unavailable (%s); using the PyTorch path", error)
    return _state["library"]


def build_in_background(*also: Callable[[], object]) -> None:
    """Starts library() and then each of `also` (other kernels' loaders, e.g. csr_linear.ready) in a thread of its
    own (once a process), so the compiler runs on another core while the caller goes on setting up; the first
    library() call waits for it (the lock). Not a daemon thread: exiting while it builds waits for the build rather
    than leaving a partial file in the cache."""

    def build_all() -> None:
        library()
        for load in also:
            load()

    with _lock:
        if "library" in _state or "builder" in _state:
            return
        _state["builder"] = threading.Thread(target=build_all, name="scvi-scale-kernel-build")
    _state["builder"].start()


def disable(reason: str) -> None:
    """Stops using the kernel in this process (it disagreed with the PyTorch path: `reason`)."""
    logger.warning("the native likelihood kernel disagrees with the PyTorch path (%s); using the PyTorch path", reason)
    _state["library"] = None


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def count_terms(
    crow: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    p: torch.Tensor,
    scale: torch.Tensor,
    theta: torch.Tensor | None,
    zi_logits: torch.Tensor | None,
    likelihood: str,
):
    """torch_ops.count_terms on float32 CPU tensors: the per-cell log-likelihood (B,) and the per-entry gradients
    d log p / d log mu, d / d theta and d / d zi_logits ((B, G) each, None where the likelihood has no such input),
    for counts stored as CSR (crow (B + 1,), cols and values (nnz,), int64, int64, float32; explicit zeros allowed)
    and the mean mu = p * scale (p (B, G), scale (B,) or (B, 1)). Needs library() to be a library."""
    library = _state["library"]
    n_cells, n_genes = p.shape
    p, scale = p.detach().contiguous(), scale.detach().reshape(n_cells).contiguous()
    crow, cols, values = crow.contiguous(), cols.contiguous(), values.detach().contiguous()
    theta_mode, stirlerr_theta = THETA_NONE, None
    if theta is not None:
        theta = theta.detach().contiguous()
        theta_mode = THETA_PER_GENE if theta.dim() == 1 else THETA_PER_ENTRY
        if theta_mode == THETA_PER_GENE:
            stirlerr_theta = torch.empty(n_genes, dtype=torch.float32)
            library.scvi_stirlerr_f32(n_genes, theta.data_ptr(), stirlerr_theta.data_ptr())
    zi_logits = None if zi_logits is None else zi_logits.detach().contiguous()
    per_cell = torch.empty(n_cells, dtype=torch.float32)
    d_log_mu = torch.empty(n_cells, n_genes, dtype=torch.float32)
    d_theta = None if theta is None else torch.empty(n_cells, n_genes, dtype=torch.float32)
    d_zi = None if zi_logits is None else torch.empty(n_cells, n_genes, dtype=torch.float32)
    arguments = (
        n_genes,
        LIKELIHOOD_CODES[likelihood],
        p.data_ptr(),
        scale.data_ptr(),
        _pointer(theta),
        theta_mode,
        _pointer(stirlerr_theta),
        _pointer(zi_logits),
        crow.data_ptr(),
        cols.data_ptr(),
        values.data_ptr(),
        per_cell.data_ptr(),
        d_log_mu.data_ptr(),
        _pointer(d_theta),
        _pointer(d_zi),
    )

    # One thread, the caller's: handing rows to a pool of Python threads beside torch's spinning OpenMP threads made
    # training slower than this (benchmarks/history/issue-24.md, steady state)
    if library.scvi_count_terms_f32(0, n_cells, *arguments) != 0:
        raise MemoryError(f"the native likelihood kernel could not allocate scratch for {n_genes} genes")
    return per_cell, d_log_mu, d_theta, d_zi
