"""Process-wide settings, read once from the environment and changeable at run time.

    >>> from scvi_scale import settings
    >>> settings.kernel_backend = "torch"     # force the PyTorch path even on a GPU

Environment variables (read when the module is first imported):
    SCVI_SCALE_KERNELS    "auto" (default), "triton" or "torch": which implementation of the fused ops runs.
                          "auto" sends CUDA tensors to Triton and CPU tensors to the fastest PyTorch path.
    SCVI_SCALE_PROGRESS   "0" turns progress bars off (they are also off when stderr is not a terminal and CI is set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

KERNEL_BACKENDS = ("auto", "triton", "torch")


def _env_backend() -> str:
    value = os.environ.get("SCVI_SCALE_KERNELS", "auto").strip().lower()
    if value not in KERNEL_BACKENDS:
        raise ValueError(f"SCVI_SCALE_KERNELS={value!r}: expected one of {KERNEL_BACKENDS}")
    return value


def _env_progress() -> bool:
    return os.environ.get("SCVI_SCALE_PROGRESS", "1").strip() not in ("0", "false", "no")


@dataclass
class Settings:
    """Mutable settings shared by the whole process; see the module docstring."""

    kernel_backend: str = field(default_factory=_env_backend)
    progress_bar: bool = field(default_factory=_env_progress)

    def __setattr__(self, name: str, value) -> None:
        if name == "kernel_backend" and value not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend={value!r}: expected one of {KERNEL_BACKENDS}")
        super().__setattr__(name, value)


settings = Settings()
