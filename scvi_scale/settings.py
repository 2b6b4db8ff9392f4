"""Process-wide settings, read once from the environment and changeable at run time.

    >>> from scvi_scale import settings
    >>> settings.kernel_backend = "torch"     # force the PyTorch path even on a GPU
    >>> settings.seed = 1                      # as scvi-tools' scvi.settings.seed

Environment variables (read when the module is first imported):
    SCVI_SCALE_KERNELS    "auto" (default), "triton", "native" or "torch": which implementation of the fused ops
                          runs. "auto" sends CUDA tensors to Triton and CPU tensors to the C kernel where it
                          builds, else to the PyTorch path (scvi_scale.kernels' docstring).
    SCVI_SCALE_CACHE_DIR  where the C kernel is built and kept (default $XDG_CACHE_HOME/scvi-scale, else
                          ~/.cache/scvi-scale).
    SCVI_SCALE_PROGRESS   "0" turns progress bars off (they are also off when stderr is not a terminal and CI is set).
    SCVI_SCALE_SEED       the default seed (0).
    SCVI_SCALE_ADAPTIVE_THREADS  "0" keeps training at torch's thread count throughout (see adaptive_threads).

seed: the default of every seed: a model's initial weights (drawn from it when SCVI() builds the module, in a
generator of their own, so torch's global generator is neither used nor changed), train(seed=) (the split, the
block order, dropout and z draws) and the outputs' seed= (draws keyed by cell). Unlike scvi-tools' setting,
assigning it seeds nothing at once: it is read when a model is built, trained or asked for outputs.

adaptive_threads: training on the CPU with more than one torch thread, while other processes use CPU, times its steps
at a few fixed steps, compares them with one thread, and keeps the faster (`threads.ThreadTuner`): beside other busy
processes, torch's spinning OpenMP threads made whole training many times slower, one thread hardly slower
(benchmarks/RESULTS.md, Threads under contention). On a quiet machine the tuner does nothing: the choice stays torch's
thread count, and the same seed gives the same model; under changing load it may not, since one and two threads round
sums differently. False keeps torch's thread count for the whole run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

KERNEL_BACKENDS = ("auto", "triton", "native", "torch")


def _env_backend() -> str:
    value = os.environ.get("SCVI_SCALE_KERNELS", "auto").strip().lower()
    if value not in KERNEL_BACKENDS:
        raise ValueError(f"SCVI_SCALE_KERNELS={value!r}: expected one of {KERNEL_BACKENDS}")
    return value


def _env_seed() -> int:
    value = os.environ.get("SCVI_SCALE_SEED", "0").strip()
    if not value.isdigit():
        raise ValueError(f"SCVI_SCALE_SEED={value!r}: expected a non-negative integer")
    return int(value)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no")


@dataclass
class Settings:
    """Mutable settings shared by the whole process; see the module docstring."""

    kernel_backend: str = field(default_factory=_env_backend)
    progress_bar: bool = field(default_factory=lambda: _env_flag("SCVI_SCALE_PROGRESS"))
    seed: int = field(default_factory=_env_seed)
    adaptive_threads: bool = field(default_factory=lambda: _env_flag("SCVI_SCALE_ADAPTIVE_THREADS"))

    def __setattr__(self, name: str, value) -> None:
        if name == "kernel_backend" and value not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend={value!r}: expected one of {KERNEL_BACKENDS}")
        if name == "seed" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"seed={value!r}: expected a non-negative integer")
        super().__setattr__(name, value)


settings = Settings()
